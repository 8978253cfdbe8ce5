"""Text in and out: K2's tokenizer (tiktoken), the BPE trainer for the project's own models, the chat template
and K2's tool-call format. Torch-free."""
