"""The command-line front ends. Each module has ``main(argv) -> exit code`` and a ``console`` entry point.

    neo-train / launch/train.py           train from YAML configs (any launcher)
    neo-preprocess / launch/preprocess.py tokenize a corpus into .bin/.idx token files
    neo-generate / launch/generate.py     sample text from a checkpoint
    neo-evaluate / launch/evaluate.py     loss, perplexity, bits per byte, lm-eval tasks
    neo-export / launch/export.py         to and from Hugging Face transformers folders
    neo verify CKPT                       check a checkpoint's files against its manifest

Every front end turns a ``NeoError`` into one line on stderr and its exit code (2), with no traceback.
"""
