"""Exercise 7 · The SFT loss mask (06_reward_model.py `render`, used by 07's SFT; Llama 3 §4.1.3 trains
"while masking loss on prompt tokens"; the chat format of §4.1 and Meta's prompt-format page).

A dialog becomes one token sequence: <|begin_of_text|>, then each message as
<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>. Fine-tuning learns only what
the assistant writes: the mask is 1 on the assistant's content AND on the <|eot_id|> that closes
it (the model must learn to stop), 0 on <|begin_of_text|>, on every header and on all tokens of
the other roles (system, user), which are given, not generated.

The tokenizer does the encoding (01_tokenizer.py):
    tokenizer.bos_id                   the id of <|begin_of_text|>
    tokenizer.encode_header(role)      the header's ids
    tokenizer.encode_message(message)  header + content + <|eot_id|>, for {"role": ..., "content": ...}

    pytest tutorials/exercises -k sft
"""


def sft_example(tokenizer, messages):
    """messages: list of {"role", "content"} dicts. -> (ids, mask): two lists of the same length."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
