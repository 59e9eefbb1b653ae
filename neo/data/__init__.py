"""Data pipeline: tokenizers, the .bin/.idx token format, preprocessing, and training datasets.

    tokenizer.py   load_tokenizer("gpt2" | "cl100k_base" | ... | path), offline; padded_vocab_size
    indexed.py     IndexedTokens (validated, memory-mapped reader) and IndexedTokensWriter
    preprocess.py  corpus -> <prefix>.bin + <prefix>.idx (python launch/preprocess.py --help)
    dataset.py     build_datasets (packing, splits, blending, cached indices) and micro_batches

Nothing is imported here, so that `import neo.data.preprocess` stays light (no torch).
"""
