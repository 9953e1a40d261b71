"""The chat templates a recipe may name (``chat_template: chatml``), as mergekit offers them.

Each is written to the model family's published prompt format, rendered exactly, with no stray
whitespace between turns (mergekit 0.1.5's files add a newline after every Llama 3 turn and indent
EXAONE's turns; these do not). ``tests/test_tokenizer_merge.py`` renders each through transformers
and compares with the format written out by hand.

- ``chatml``: ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` per message.
- ``llama3``: BOS, then ``<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>``.
- ``alpaca``: the system text, then ``### Instruction:`` / ``### Input:`` (role ``user_context``) /
  ``### Response:`` blocks, separated by blank lines.
- ``mistral``: BOS, ``[INST] USER [/INST]`` and `` ASSISTANT</s>``, the system text before the first
  user turn; roles must alternate.
- ``exaone``: ``[|ROLE|]CONTENT``, a user turn ending in a newline, the others in
  ``[|endofturn|]\\n``; an empty system turn first when the conversation has none.
"""

from __future__ import annotations

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

ALPACA = (
    "{%- set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} -%}"
    "{%- set ns = namespace(gap='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' or message['role'] in headers -%}"
    "{{ ns.gap + (headers[message['role']] + '\\n' if message['role'] in headers else '')"
    " + message['content'] | trim }}"
    "{%- set ns.gap = '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
    "{{ ns.gap + '### Response:\\n' }}{%- endif -%}"
)

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('mistral: after an optional system message, roles must alternate user/assistant') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

EXAONE = (
    "{%- if messages and messages[0]['role'] != 'system' -%}{{ '[|system|][|endofturn|]\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"
)

NAMED = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA, "mistral": MISTRAL, "exaone": EXAONE}
