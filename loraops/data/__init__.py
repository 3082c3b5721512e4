"""Training files: formats, the one reader, row keys, tokenization and the embedded chatterbot import."""
