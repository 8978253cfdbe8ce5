"""Number formats and files: the FP8 e4m3 block codec (fp8), checkpoint reading (checkpoint) and
writing (writer), and the error type they raise (errors). Imports neither hybrid nor cpu_experts."""
