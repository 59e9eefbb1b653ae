"""neo <-> Hugging Face transformers, exactly (renames and reshapes; never a conversion of values):

common.py      the Family interface, rotary parameters, name checks shared by the families
gpt_neox.py    GPTNeoXForCausalLM            llama.py     LlamaForCausalLM (and the Llama-family mapping)
mistral.py     MistralForCausalLM            qwen2.py     Qwen2ForCausalLM
hf.py          choosing the family, state-dict mapping, writing an HF folder from a neo checkpoint
hf_import.py   an HF folder as a neo checkpoint (any tp/pp), with its tokenizer
"""
