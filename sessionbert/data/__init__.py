"""Data: event schema and validation, console simulator, serialisation, tokenizer, datasets."""
