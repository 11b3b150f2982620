"""library/models/text.py: A1111 prompt weighting, 75-token chunks, SD2 padding, clip skip."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library.models.clip_vocab import write_clip_tokenizer_files
from library.errors import UserError
from library.models.text import PromptEncoder, last_token_states, parse_prompt_attention

BOS, EOS = 49406, 49407
CAT = 2368  # "cat" is one token, so "cat " * n is exactly n tokens


def cats(n: int) -> str:
    return " ".join(["cat"] * n)


# Expected values are A1111's (modules/prompt_parser.py doctests first), with the weights written
# as the same float operations A1111 performs, so equality is exact.
PARSER_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
         ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
    ),
    ("", [("", 1.0)]),
    ("(a)", [("a", 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
    ("(a:1.3)", [("a", 1.3)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),  # current A1111 allows spaces around the number
    ("(a:-1)", [("a", -1.0)]),
    ("((a:1.3))", [("a", 1.3 * 1.1)]),
    ("[(a:1.5)] b", [("a", 1.5 * (1 / 1.1)), (" b", 1.0)]),
    ("x (a [b] c) y", [("x ", 1.0), ("a ", 1.1), ("b", (1 / 1.1) * 1.1), (" c", 1.1), (" y", 1.0)]),
    ("(a)(b:1.1)", [("ab", 1.1)]),  # adjacent equal weights merge
    ("a)", [("a)", 1.0)]),  # a stray closer is text
    ("a]", [("a]", 1.0)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("(a:1.3", [("a:1.3", 1.1)]),  # no ")" after the number: text, and the "(" stays open
    ("a:b", [("a:b", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("\\\\", [("\\", 1.0)]),
    ("\\[a\\)", [("[a)", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash escapes nothing and disappears
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),  # BREAK only as a whole word
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0 * 1.1), ("b", 1.1)]),  # A1111: no longer a break
]


@pytest.mark.parametrize("text,expected", PARSER_CASES)
def test_parse_prompt_attention_matches_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


def _tiny_encoder_parts(folder, pad_token: str, pad_id: int):
    write_clip_tokenizer_files(folder, pad_token=pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOS, pad_token_id=pad_id,
    )
    return tokenizer, CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _tiny_encoder_parts(tmp_path_factory.mktemp("tok-sd1"), "<|endoftext|>", EOS)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return _tiny_encoder_parts(tmp_path_factory.mktemp("tok-sd2"), "!", 0)


@pytest.mark.parametrize("n_tokens,max_len,n_chunks", [(75, 75, 1), (100, 150, 2), (200, 225, 3)])
def test_training_chunks_shapes_and_layout(sd1, n_tokens, max_len, n_chunks):
    enc = PromptEncoder(*sd1, max_token_length=max_len)
    prompts = [cats(n_tokens), "a cat"]
    chunks = enc.tokenize(prompts)
    assert chunks.ids.shape == (2, n_chunks, 77)
    assert (chunks.ids[:, :, 0] == BOS).all() and (chunks.ids[:, :, -1] == EOS).all()
    text = chunks.ids[0].flatten()
    assert (text == CAT).sum() == n_tokens  # nothing lost, nothing repeated
    assert enc.chunks_needed(prompts) == n_chunks
    with torch.no_grad():
        states = enc.encode(prompts)
    assert states.shape == (2, 77 * n_chunks, 32)


def test_chunk_boundary_at_75_tokens(sd1):
    enc = PromptEncoder(*sd1, max_token_length=150)
    assert enc.chunks_needed([cats(75)]) == 1
    assert enc.chunks_needed([cats(76)]) == 2
    ids = enc.tokenize([cats(76)]).ids[0]
    assert ids[0, 1:76].tolist() == [CAT] * 75 and ids[0, 76] == EOS
    assert ids[1, :3].tolist() == [BOS, CAT, EOS]


def test_chunks_are_encoded_separately_and_concatenated(sd1):
    enc = PromptEncoder(*sd1, max_token_length=150)
    with torch.no_grad():
        long = enc.encode([cats(100)])
        head = enc.encode([cats(75)], num_chunks=1)
        tail = enc.encode([cats(25)], num_chunks=1)
    torch.testing.assert_close(long[:, :77], head, rtol=0, atol=0)
    torch.testing.assert_close(long[:, 77:], tail, rtol=0, atol=0)


def test_training_truncates_to_max_token_length(sd1):
    enc = PromptEncoder(*sd1, max_token_length=75)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode([cats(100)]), enc.encode([cats(75)]), rtol=0, atol=0)


def test_generation_uses_as_many_chunks_as_the_longest_prompt(sd1):
    enc = PromptEncoder(*sd1)  # max_token_length only bounds training
    prompts, negatives = ["a cat"], [cats(160)]
    n = enc.chunks_needed(prompts + negatives, weighted=True)
    assert n == 3
    with torch.no_grad():
        cond = enc.encode(prompts, weighted=True, num_chunks=n)
        uncond = enc.encode(negatives, weighted=True, num_chunks=n)
        empty = enc.encode([""], num_chunks=1)
    assert cond.shape == uncond.shape == (1, 231, 32)
    # the short prompt is padded with empty chunks (BOS EOS pad ...)
    torch.testing.assert_close(cond[:, 77:154], empty, rtol=0, atol=0)


def test_sd2_pads_with_exclamation_mark_after_eos(sd2):
    tokenizer, _ = sd2
    assert tokenizer.pad_token_id == 0
    enc = PromptEncoder(*sd2, max_token_length=150)
    ids = enc.tokenize(["a cat"]).ids[0]
    assert ids[0].tolist() == [BOS, 320, CAT, EOS] + [0] * 73
    assert ids[1].tolist() == [BOS, EOS] + [0] * 75
    full = enc.tokenize([cats(75)], num_chunks=1).ids[0, 0]
    assert full[-1] == EOS and (full == 0).sum() == 0
    with torch.no_grad():
        assert enc.encode(["a cat"]).shape == (1, 154, 32)


def test_clip_skip_is_penultimate_layer_through_final_layer_norm(sd1):
    tokenizer, model = sd1
    enc1 = PromptEncoder(tokenizer, model, clip_skip=1)
    enc2 = PromptEncoder(tokenizer, model, clip_skip=2)
    prompts = ["a photo of a cat", "a dog"]
    with torch.no_grad():
        s1, s2 = enc1.encode(prompts), enc2.encode(prompts)
        ids = enc2.tokenize(prompts).ids[:, 0]
        out = model(input_ids=ids, output_hidden_states=True)
        expected = model.final_layer_norm(out.hidden_states[-2])
    assert s1.shape == s2.shape == (2, 77, 32)
    assert not torch.allclose(s1, s2)
    torch.testing.assert_close(s2, expected, rtol=0, atol=0)
    torch.testing.assert_close(s1, out.last_hidden_state, rtol=0, atol=0)


def test_weights_of_one_equal_unweighted(sd1):
    enc = PromptEncoder(*sd1, max_token_length=150)
    with torch.no_grad():
        plain = enc.encode(["a photo of a cat, " + cats(90)])
        weighted = enc.encode(["a photo of a cat, " + cats(90)], weighted=True)
        explicit_one = enc.encode(["a photo of a (cat:1.0), " + cats(90)], weighted=True)
    torch.testing.assert_close(weighted, plain, rtol=0, atol=0)
    torch.testing.assert_close(explicit_one, plain)


def test_weight_scales_its_token_and_keeps_the_chunk_mean(sd1):
    enc = PromptEncoder(*sd1)
    with torch.no_grad():
        plain = enc.encode(["a photo of a cat"])
        weighted = enc.encode(["a photo of a (cat:1.5)"], weighted=True)
    assert not torch.allclose(plain, weighted)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    # every state is scaled by the same restoring factor; the weighted token by 1.5 more
    ratio = weighted / plain
    factor = ratio[0, 0, 0]
    cat_pos = 5  # BOS a photo of a cat
    torch.testing.assert_close(ratio[0, cat_pos], torch.full((32,), 1.5 * factor.item()))
    others = torch.cat([ratio[0, :cat_pos], ratio[0, cat_pos + 1 :]])
    torch.testing.assert_close(others, torch.full_like(others, factor.item()))


def test_weighting_is_per_prompt_not_per_batch(sd1):
    enc = PromptEncoder(*sd1)
    with torch.no_grad():
        alone = enc.encode(["(cat:1.4) on a mat"], weighted=True)
        batch = enc.encode(["(cat:1.4) on a mat", "[dog]"], weighted=True)
    torch.testing.assert_close(batch[:1], alone)


def test_break_starts_a_new_chunk(sd1):
    enc = PromptEncoder(*sd1)
    assert enc.chunks_needed(["a cat BREAK a dog"], weighted=True) == 2
    assert enc.chunks_needed(["a cat BREAK a dog"], weighted=False) == 1  # training: plain text
    ids = enc.tokenize(["a cat BREAK a dog"], weighted=True, num_chunks=2).ids[0]
    assert ids[0, :4].tolist() == [BOS, 320, CAT, EOS]
    assert ids[1, 0] == BOS and ids[1, 3] == EOS


def test_dtype_no_grad_and_last_token(sd1):
    tokenizer, model = sd1
    enc = PromptEncoder(tokenizer, copy.deepcopy(model).to(torch.bfloat16))  # the fixture stays fp32
    with torch.no_grad():
        states = enc.encode(["a cat", "(a dog:1.2)"], weighted=True)
    assert states.dtype == torch.bfloat16 and not states.requires_grad
    last = last_token_states(states)
    assert last.shape == (2, 1, 32)
    assert torch.equal(last[:, 0], states[:, -1])


@pytest.mark.parametrize("bad", [0, 77, 100, 300])
def test_invalid_max_token_length_is_a_user_error(sd1, bad):
    with pytest.raises(UserError, match=rf"max_token_length must be one of 75, 150, 225 \(got {bad}\)"):
        PromptEncoder(*sd1, max_token_length=bad)


@pytest.mark.parametrize("bad", [0, 5])
def test_invalid_clip_skip_is_a_user_error(sd1, bad):
    with pytest.raises(UserError, match=r"clip_skip must be between 1 and 4"):
        PromptEncoder(*sd1, clip_skip=bad)
