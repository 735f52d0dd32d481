"""The preset dictionary of version 2 deflated headers (spec/FORMAT.md 3.3; its bytes are also the
file spec/header-dictionary-2.txt, and a test holds the two equal).

A zlib stream may start from a preset dictionary: text the compressor may refer back to as if it
had come before the stream (RFC 1950, FDICT). A small adapter's header is mostly text every header
repeats — key names, a PEFT ``adapter_config`` with its dozens of default keys, module names — and
deflate pays for the first occurrence of each. This text holds them, so a 24-tensor LoRA's header
costs ~35 % fewer bytes. The text is frozen: a stream names it by its Adler-32, and changing one byte
would make every file written with it unreadable. The most common pieces come last (deflate codes
near matches more cheaply).
"""

from __future__ import annotations

import zlib

HEADER_DICTIONARY = (
    # model files and full fine-tunes
    '"model_files":{"config.json":"{\\n  \\"architectures\\": [\\n    \\"LlamaForCausalLM\\"\\n  ],\\n  '
    '\\"attention_bias\\": false,\\n  \\"bos_token_id\\": 1,\\n  \\"eos_token_id\\": 2,\\n  \\"hidden_act\\": '
    '\\"silu\\",\\n  \\"hidden_size\\": 4096,\\n  \\"initializer_range\\": 0.02,\\n  \\"intermediate_size\\": '
    '11008,\\n  \\"max_position_embeddings\\": 4096,\\n  \\"model_type\\": \\"llama\\",\\n  '
    '\\"num_attention_heads\\": 32,\\n  \\"num_hidden_layers\\": 32,\\n  \\"num_key_value_heads\\": 32,\\n  '
    '\\"rms_norm_eps\\": 1e-05,\\n  \\"rope_theta\\": 10000.0,\\n  \\"tie_word_embeddings\\": false,\\n  '
    '\\"torch_dtype\\": \\"bfloat16\\",\\n  \\"transformers_version\\": \\"4.57.0\\",\\n  \\"use_cache\\": true,'
    '\\n  \\"vocab_size\\": 32000\\n}\\n","generation_config.json":"{\\n  \\"_from_model_config\\": true,\\n}\\n"},'
    '"source":"full","base_fingerprint":"sha256:","adapter_config":null,"build":{"name":"","origin":"",'
    '"source_id":"","settings":{}},"tuning":{"densities":[],"alphas":[],"scores":[],"chosen":{"density":0.1,'
    '"alpha":1.0,"score":}},"alpha_rule":"unbiased","alpha_rule":"norm","sigma":,"threshold":,"scope":"global",'
    # module and tensor names of common architectures
    '{"name":"encoder.block.0.layer.0.SelfAttention.q.lora_A.weight","decoder.block.0.layer.1.EncDecAttention.k",'
    '"transformer.h.0.attn.c_attn.lora_A.weight","transformer.h.0.mlp.c_fc.weight","transformer.h.0.attn.c_proj",'
    '"transformer.h.0.ln_1.weight","bert.encoder.layer.0.attention.self.key.lora_A.weight",'
    '"encoder.layer.0.attention.output.dense.weight","encoder.layer.0.attention.output.LayerNorm.weight",'
    '"encoder.layer.0.intermediate.dense.weight","encoder.layer.0.output.dense.bias","classifier.weight",'
    '"model.embed_tokens.weight","model.norm.weight","lm_head.weight","model.layers.0.input_layernorm.weight",'
    '"model.layers.0.post_attention_layernorm.weight","model.layers.0.mlp.gate_proj.weight",'
    '"model.layers.0.mlp.up_proj.weight","model.layers.0.mlp.down_proj.weight","model.layers.0.self_attn.k_proj",'
    '"model.layers.0.self_attn.o_proj.weight","base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",'
    '"lora_embedding_A","lora_embedding_B","lora_magnitude_vector","modules_to_save","dtype":"F32","dtype":"F16",'
    '"shape":[4096,4096],"encoding":"dense","role":"value","init":null,"offset":0,"length":0,"crc32":0},'
    '"encoding":"ternary-golomb","role":"delta","init":null,"offset":0,"length":0,"crc32":0,"nnz":0,"scale":0.0,'
    '"golomb_m":7,"chunk_size":16384,"unary_bits":0,"high_bits":0},'
    # a PEFT LoRA adapter_config.json, as PEFT writes it (keys sorted)
    '{"format":"compeft","format_version":2,"metadata":{"created_by":"compeft 0.1.0","source":"peft",'
    '"density":0.1,"alpha":null,"scope":"tensor","base_fingerprint":null,"adapter_config":'
    '{"alora_invocation_tokens":null,"alpha_pattern":{},"arrow_config":null,"auto_mapping":null,'
    '"base_model_name_or_path":null,"bias":"none","corda_config":null,'
    '"ensure_weight_tying":false,"eva_config":null,"exclude_modules":null,"fan_in_fan_out":false,'
    '"inference_mode":true,"init_lora_weights":true,"kasa_config":null,"layer_replication":null,'
    '"layers_pattern":null,"layers_to_transform":null,"loftq_config":{},"lora_alpha":8,"lora_bias":false,'
    '"lora_dropout":0.0,"lora_ga_config":null,"megatron_config":null,"megatron_core":"megatron.core",'
    '"modules_to_save":null,"monteclora_config":null,"peft_type":"LORA","peft_version":"0.21.2",'
    '"qalora_group_size":16,"r":8,"rank_pattern":{},"revision":null,"target_modules":["q_proj",'
    '"v_proj"],"target_parameters":null,"task_type":null,"trainable_token_indices":null,'
    '"use_bdlora":null,"use_dora":false,"use_qalora":false,"use_rslora":false,"velora_config":null},'
    '"user":{},"alpha_rule":"product-unbiased","fidelity":{"overall":[0.9,0.5],"tensors":[[0.9,0.5],[1.0,0.5]],'
    '"lora":[[1.0,0.5],[1.0,0.5]],"lora_overall":[1.0,0.5]}},"tensors":['
    # the entry every LoRA header repeats most
    '{"name":"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight","dtype":"BF16","shape":[16,4096],'
    '"encoding":"ternary-golomb-packed","role":"delta","init":0.0,"offset":0,"length":0,"crc32":0,"nnz":0,'
    '"scale":0.0,"golomb_m":7,"unary_bits":0,"high_bits":0},'
    '{"name":"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight","dtype":"BF16","shape":[4096,16],'
    '"encoding":"ternary-golomb-packed","role":"delta","init":0.0,"offset":0,"length":'
).encode("ascii")

HEADER_DICTIONARY_ID = zlib.adler32(HEADER_DICTIONARY)  # what a stream's DICTID field holds (RFC 1950)
