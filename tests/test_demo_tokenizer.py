"""The demo model's closed-vocabulary CLIP tokenizer."""

from brushnet.demo.scenes import VOCABULARY, caption_words, iter_scenes
from brushnet.demo.tokenizer import BOS, EOS, write_tokenizer


def test_captions_tokenize_exactly_and_briefly(tmp_path):
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    vocab = tokenizer.get_vocab()
    assert tokenizer.bos_token == BOS and tokenizer.eos_token == EOS and tokenizer.pad_token == EOS
    longest = 0
    for scene in iter_scenes(range(300)):
        ids = tokenizer(scene.caption).input_ids
        assert ids[0] == vocab[BOS] and ids[-1] == vocab[EOS]
        assert vocab[EOS] not in ids[1:-1]  # no word fell back to the unknown token
        # One token per word: the text encoder sees the caption's words as units.
        assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in caption_words(scene.caption)]
        longest = max(longest, len(ids))
    assert longest <= tokenizer.model_max_length == 77
    # Every vocabulary word is known; an unseen word still tokenizes, into its characters.
    for word in VOCABULARY:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    assert len(tokenizer("crab").input_ids) > 2


def test_reloads_from_the_folder(tmp_path):
    from transformers import CLIPTokenizer

    first = write_tokenizer(tmp_path / "t")
    again = CLIPTokenizer.from_pretrained(tmp_path / "t")
    caption = "a red circle and a blue square on a yellow background"
    assert first(caption).input_ids == again(caption).input_ids
