"""Chat templates render exactly the reference strings, and the HF jinja form agrees with them."""

from __future__ import annotations

import dataclasses

import pytest

from matvlm.data.templates import TemplateError, get_template, list_templates
from matvlm.data.tokenizer import train_tokenizer

SYS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYS_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def conv(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def chat(*values: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": v} for i, v in enumerate(values)]


# ----------------------------------------------------------------------------- exact strings
def test_phi_single_turn_exact():
    text = get_template("phi").render(conv("<image>\nWhat is shown?", "A red square."))
    assert text == SYS_USER + " USER: <image>\nWhat is shown? ASSISTANT: A red square.<|endoftext|>"


def test_phi_multi_turn_exact_no_space_after_end_token():
    # TinyLLaVA: only the system prompt is followed by a space; later turns start right after eos.
    text = get_template("phi").render(conv("<image>\nQ1?", "A1.", "Q2?", "A2."))
    assert text == (
        SYS_USER + " USER: <image>\nQ1? ASSISTANT: A1.<|endoftext|>USER: Q2? ASSISTANT: A2.<|endoftext|>"
    )


def test_image_placeholder_moved_to_front_and_stripped():
    phi = get_template("phi")
    assert phi.format_question("What is this?\n<image>") == "<image>\nWhat is this?"
    assert phi.format_question("  <image>  ") == "<image>"
    assert phi.format_question(" no image ") == " no image "  # untouched without a placeholder


def test_vicuna_v1_and_llava_v1_exact():
    messages = conv("<image>\nQ1?", "A1.", "Q2?", "A2.")
    assert get_template("vicuna_v1").render(messages) == (
        SYS_USER + " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"
    )
    assert get_template("v1") is get_template("vicuna_v1")
    assert get_template("llava_v1").render(messages).startswith(SYS_HUMAN + " USER: <image>\nQ1?")


def test_plain_is_image_then_caption():
    plain = get_template("plain")
    assert plain.render(conv("Describe the picture.\n<image>", "A cat on a mat.")) == "<image>A cat on a mat.\n"
    assert plain.segments(conv("<image>\nDescribe.", "A cat.")) == [("<image>", False), ("A cat.\n", True)]
    with pytest.raises(TemplateError, match="at most 1 turn"):
        plain.render(conv("<image>", "a", "b", "c"))


# ----------------------------------------------------------------------------- segments / prompts
@pytest.mark.parametrize("name", ["phi", "vicuna_v1", "llava_v1"])
def test_segments_supervise_answers_and_end_token_only(name):
    tpl = get_template(name)
    messages = conv("<image>\nQ1?", "Answer one.", "Q2?", "Answer two.")
    segs = tpl.segments(messages)
    assert "".join(t for t, _ in segs) == tpl.render(messages)
    assert [t for t, sup in segs if sup] == [" Answer one." + tpl.end, " Answer two." + tpl.end]
    assert all("USER" not in t and "ASSISTANT" not in t for t, sup in segs if sup)


def test_generation_prompt_is_training_prefix():
    phi = get_template("phi")
    full = phi.render(conv("<image>\nQ1?", "A1.", "Q2?", "A2."))
    prompt = phi.generation_prompt(conv("<image>\nQ1?", "A1.", "Q2?"))
    assert prompt.endswith("USER: Q2? ASSISTANT:")
    assert full == prompt + " A2.<|endoftext|>"


def test_hf_messages_and_system_override():
    phi = get_template("phi")
    messages = [{"role": "system", "content": "Be brief."}] + chat("Hi?", "Hello.")
    assert phi.render(messages) == "Be brief. USER: Hi? ASSISTANT: Hello.<|endoftext|>"
    assert phi.render(chat("Hi?", "Hello."), system="X") == "X USER: Hi? ASSISTANT: Hello.<|endoftext|>"


@pytest.mark.parametrize(
    "messages, match",
    [
        (conv("A", "B")[::-1], "expected a user message"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "alternate"),
        ([{"from": "robot", "value": "a"}], "unknown role"),
        ([{"from": "human", "value": 3}], "must be a string"),
        (chat("q", "a") + [{"role": "system", "content": "s"}], "only allowed first"),
    ],
)
def test_bad_conversations_raise(messages, match):
    with pytest.raises(TemplateError, match=match):
        get_template("phi").render(messages)


def test_segments_and_prompt_need_the_right_last_turn():
    phi = get_template("phi")
    with pytest.raises(TemplateError, match="ends with an assistant"):
        phi.segments(conv("Q?"))
    with pytest.raises(TemplateError, match="ends with a user"):
        phi.generation_prompt(conv("Q?", "A."))


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_template("chatml")
    for name in ("phi", "vicuna_v1", "plain", "llava_v1"):
        assert name in str(err.value)
    assert set(list_templates()) >= {"phi", "vicuna_v1", "plain"}


# ----------------------------------------------------------------------------- jinja
@pytest.fixture(scope="module")
def tokenizers_by_template():
    corpus = ["What is shown? A red square. Count: 12 dots.", "Describe the image in detail."] * 4
    return {name: train_tokenizer(corpus, vocab_size=400, template=name) for name in list_templates()}


CASES = [
    chat("<image>\nWhat is shown?", "A red square."),
    chat("What is shown?\n<image>", "A red square.", "And the color?", "Red."),
    chat("Text only question", "Text answer"),
    chat("  <image>  ", "Only an image."),
    [{"role": "system", "content": "Custom system."}] + chat("Hi <image> there", "Yes."),
]


JINJA_PARAMS = [
    (name, case)
    for name in ["phi", "vicuna_v1", "llava_v1", "plain"]
    for case in range(len(CASES))
    if name != "plain" or sum(m["role"] == "user" for m in CASES[case]) == 1  # plain: one turn
]


@pytest.mark.parametrize("name, case", JINJA_PARAMS)
def test_jinja_matches_template(tokenizers_by_template, name, case):
    tpl, tok = get_template(name), tokenizers_by_template[name]
    messages = CASES[case]
    assert tok.apply_chat_template(messages, tokenize=False) == tpl.render(messages)
    prompt_messages = messages[:-1]
    assert tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True) == (
        tpl.generation_prompt(prompt_messages)
    )


def test_jinja_assistant_mask_matches_segments(tokenizers_by_template):
    tok, tpl = tokenizers_by_template["phi"], get_template("phi")
    messages = chat("<image>\nWhat is shown?", "A red square.", "Count?", "12 dots.")
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    supervised = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    expected = "".join(t for t, sup in tpl.segments(messages) if sup)
    assert tok.decode(supervised) == expected == " A red square.<|endoftext|> 12 dots.<|endoftext|>"


def test_jinja_escapes_odd_characters(tokenizers_by_template):
    tok = tokenizers_by_template["phi"]
    odd = dataclasses.replace(get_template("phi"), system="It's a \\ \"test\" \u2014 \u00fc \U0001f600\n{{ x }}")
    tok2 = type(tok)(tokenizer_object=tok.backend_tokenizer, chat_template=odd.to_jinja())
    messages = chat("Q 'quoted' \\ {% raw %}", "A.")
    assert tok2.apply_chat_template(messages, tokenize=False) == odd.render(messages)


def test_jinja_rejects_bad_order(tokenizers_by_template):
    tok = tokenizers_by_template["phi"]
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template(chat("a", "b")[::-1], tokenize=False)


def test_phi_short_has_no_system_prompt():
    from matvlm.data.templates import get_template

    t = get_template("phi_short")
    msgs = [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red"}]
    assert t.render(msgs) == "USER: <image>\nWhat color? ASSISTANT: red<|endoftext|>"
    assert [text for text, supervised in t.segments(msgs) if supervised] == [" red<|endoftext|>"]
    from matvlm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["What color? red", "hello"] * 5, vocab_size=300, template="phi_short")
    msgs = msgs + [{"role": "user", "content": "And?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == t.render(
        msgs, add_generation_prompt=True)
