"""The offline CLIP tokenizer reproduces OpenAI CLIP's token ids (values published with CLIP / SD)."""

from sdtrain.models.clip_tokenizer import build_clip_tokenizer, clip_vocab

BOS, EOS = 49406, 49407


def test_known_prompt_ids():
    tokenizer = build_clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]


def test_vocabulary_size_and_specials():
    vocab = clip_vocab()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert vocab["!"] == 0 and vocab["cat</w>"] == 2368
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)


def test_padding_first_tokenizer_uses_eos():
    ids = build_clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [BOS, 320, 2368, EOS]
    assert len(ids) == 77 and set(ids[4:]) == {EOS}


def test_padding_second_tokenizer_uses_exclamation_mark():
    tokenizer = build_clip_tokenizer(pad_token="!")
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    ids = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [BOS, 320, 2368, EOS]
    assert len(ids) == 77 and set(ids[4:]) == {0}


def test_truncation_keeps_end_token():
    tokenizer = build_clip_tokenizer()
    ids = tokenizer(" ".join(["cat"] * 100), truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == BOS and ids[-1] == EOS and ids[1:-1] == [2368] * 75
