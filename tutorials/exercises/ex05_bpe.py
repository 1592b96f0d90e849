"""Exercise 5 · One byte-pair-encoding merge step (01_tokenizer.py `train_bpe`, `merge_pair`;
Llama 3 §3.2: a 128K-token vocabulary, 100K of it from tiktoken's BPE).

BPE training starts from bytes and repeats one step: count every adjacent pair of tokens over all
chunks (a chunk seen `freq` times counts `freq` times), take the most frequent pair (ties go to the
smallest pair, compared as tuples, so training is deterministic), give it a new id, and replace it
in every chunk, scanning left to right: [a, a, a] with (a, a) merged becomes [new, a].

    pytest tutorials/exercises -k bpe
"""


def most_frequent_pair(words, freqs):
    """words: list of token-id lists; freqs: how often each occurs. -> the (left, right) pair with the
    highest count, the smallest such pair on a tie."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code


def merge_pair(word, left, right, new_id):
    """word: list of token ids -> a new list with each (left, right), scanning left to right, replaced by new_id."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
