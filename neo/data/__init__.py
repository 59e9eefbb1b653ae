"""Data pipeline: tokenizers, the .bin/.idx token format, preprocessing, and training datasets.

    tokenizer.py   load_tokenizer("gpt2" | "cl100k_base" | ... | path), offline; padded_vocab_size
    indexed.py     IndexedTokens (validated, memory-mapped reader; loss masks, comparisons) and its writer
    sources.py     the inputs preprocessing reads (files, directories, globs, HF datasets), streamed in chunks
    preprocess.py  corpus -> <prefix>.bin + <prefix>.idx (+ .mask, .pairs) (python launch/preprocess.py --help)
    records.py     chat and preference records (JSON lines) -> checked conversations -> token examples
    chat.py        chat templates (chatml, plain, Jinja, tokenizer_config.json): ids + loss masks, prompts
    dataset.py     build_datasets (packing, splits, blending, cached indices) and micro_batches
    examples.py    ChatDataset, PreferenceDataset, build_example_datasets: whole examples for SFT / preferences

Nothing is imported here, so that `import neo.data.preprocess` stays light (no torch).
"""
