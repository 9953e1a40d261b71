"""Tokenizer merges (``tokenizer_source``, the ``tokenizer:`` block, ``chat_template``): models with
different vocabularies, their embedding and LM-head rows aligned token by token, checked against
mergekit 0.1.5's run_merge token by token, plus the written tokenizer, config and the errors."""

import json
import shutil

import pytest
import torch
from helpers import assert_peer_close, tensors_of
from modelfusion.demos.streaming import llama_shapes
from modelfusion.errors import RecipeError
from modelfusion.io import save_model
from modelfusion.pipeline import merge, plan_merge
from peers import run_mergekit

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(20)]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def write_model(path, tokens: list[str], seed: int, added: tuple[str, ...] = (), template: str | None = None):
    """A 2-layer Llama whose vocabulary is ``tokens`` (then ``added`` special tokens), with its tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = len(tokens) + len(added)
    shapes, config = llama_shapes(hidden=32, layers=2, intermediate=48, vocab=vocab, kv_heads=2, heads=4)
    config["tie_word_embeddings"] = False
    g = torch.Generator().manual_seed(seed)
    save_model(path, {n: torch.randn(s, generator=g) * 0.1 for n, s in shapes.items()}, config)
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        fast.add_special_tokens({"additional_special_tokens": list(added)})
    if template:
        fast.chat_template = template
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    shuffled = [WORDS[i] for i in (5, 1, 0, 19, 7, 2, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)]  # no w3
    return (
        write_model(root / "base", SPECIAL + WORDS, 0, template=TEMPLATE),
        write_model(root / "a", SPECIAL + WORDS + ["cat", "dog"], 1, template=TEMPLATE),
        write_model(root / "b", SPECIAL + shuffled + ["dog", "fish"], 2, added=("<|im_start|>",)),
    )


def vocab_of(path) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(str(path)).get_vocab()


def assert_same_by_token(ours_dir, theirs_dir):
    """Every tensor equal; vocabulary-indexed ones row by row through each output's own token ids."""
    ours, theirs = tensors_of(ours_dir), tensors_of(theirs_dir)
    assert ours.keys() == theirs.keys()
    ours_vocab, theirs_vocab = vocab_of(ours_dir), vocab_of(theirs_dir)
    assert ours_vocab.keys() == theirs_vocab.keys()
    tokens = sorted(ours_vocab)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, name
        if name in VOCAB_TENSORS:
            ours_rows = ours[name][[ours_vocab[t] for t in tokens]]
            theirs_rows = theirs[name][[theirs_vocab[t] for t in tokens]]
            assert_peer_close(ours_rows, theirs_rows, "peer_float32", msg=name)
            padding = range(len(ours_vocab), ours[name].shape[0])
            assert_peer_close(ours[name][list(padding)], theirs[name][list(padding)], "peer_float32", msg=name)
        else:
            assert_peer_close(ours[name], theirs[name], "peer_float32", msg=name)
    ours_config = json.loads((ours_dir / "config.json").read_text())
    assert ours_config["vocab_size"] == json.loads((theirs_dir / "config.json").read_text())["vocab_size"]
    assert ours_config["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]


RECIPES = {
    "union-linear": """
merge_method: linear
models: [{{model: {base}, parameters: {{weight: 0.5}}}}, {{model: {a}, parameters: {{weight: 0.3}}}},
         {{model: {b}, parameters: {{weight: 0.2}}}}]
tokenizer_source: union
dtype: float32
""",
    "base-task-arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models: [{{model: {a}, parameters: {{weight: 0.7}}}}, {{model: {b}, parameters: {{weight: 0.4}}}}]
tokenizer_source: base
dtype: float32
""",
    "model-source-ties": """
merge_method: ties
base_model: {base}
models: [{{model: {a}, parameters: {{weight: 1.0}}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]
parameters: {{density: 0.6}}
tokenizer_source: {b}
dtype: float32
""",
    "block-rules-padding": """
merge_method: linear
models: [{{model: {a}, parameters: {{weight: 0.6}}}}, {{model: {b}, parameters: {{weight: 0.4}}}}]
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    cat: {{source: {{kind: zero}}}}
    w5: {{source: {{kind: model_token, model: {b}, token: dog}}, force: true}}
    "<new>": {{source: {{kind: model_token, model: {a}, token_id: 4}}}}
dtype: float32
""",
}


@pytest.mark.parametrize("kind", list(RECIPES))
def test_matches_mergekit_token_by_token(models, tmp_path, kind):
    base, a, b = models
    recipe = RECIPES[kind].format(base=base, a=a, b=b)
    run_mergekit(recipe, tmp_path / "mergekit")
    merge(recipe, tmp_path / "ours", progress=False)
    assert_same_by_token(tmp_path / "ours", tmp_path / "mergekit")


def test_rows_follow_the_rules(models, tmp_path):
    """Hand-checked rows: a model's own row; the only holder's; the base's; the mean; zero; forced."""
    base, a, b = models
    recipe = f"""
merge_method: linear
base_model: {base}
models: [{{model: {base}, parameters: {{weight: 0.0}}}}, {{model: {a}, parameters: {{weight: 1.0}}}},
         {{model: {b}, parameters: {{weight: 0.0}}}}]
tokenizer:
  source: union
  tokens:
    w7: {{source: {b}, force: true}}
    "<gap>": {{source: {{kind: zero}}}}
dtype: float32
"""
    merge(recipe, tmp_path / "out", progress=False)
    out = tensors_of(tmp_path / "out")["model.embed_tokens.weight"]
    vocab = vocab_of(tmp_path / "out")
    rows = {p: tensors_of(p)["model.embed_tokens.weight"] for p in (base, a, b)}
    own = {p: vocab_of(p) for p in (base, a, b)}
    # weights 0/1/0: the output is model a's aligned rows
    assert torch.equal(out[vocab["w1"]], rows[a][own[a]["w1"]])  # a has it: its own row
    assert torch.equal(out[vocab["fish"]], rows[b][own[b]["fish"]])  # only b has it
    assert torch.equal(out[vocab["<|im_start|>"]], rows[b][own[b]["<|im_start|>"]])
    assert torch.equal(out[vocab["w7"]], rows[b][own[b]["w7"]])  # forced from b
    assert torch.equal(out[vocab["<gap>"]], torch.zeros(32))
    assert out.shape[0] == len(vocab)


def test_without_a_base_a_token_two_models_share_is_their_mean(models, tmp_path):
    base, a, b = models
    recipe = f"""
merge_method: linear
models: [{{model: {base}, parameters: {{weight: 1.0}}}}, {{model: {a}, parameters: {{weight: 0.0}}}},
         {{model: {b}, parameters: {{weight: 0.0}}}}]
tokenizer_source: union
dtype: float32
"""
    merge(recipe, tmp_path / "out", progress=False)
    out = tensors_of(tmp_path / "out")["model.embed_tokens.weight"]
    vocab = vocab_of(tmp_path / "out")
    rows = {p: tensors_of(p)["model.embed_tokens.weight"] for p in (a, b)}
    expected = (rows[a][vocab_of(a)["dog"]] + rows[b][vocab_of(b)["dog"]]) / 2  # base lacks "dog"
    assert_peer_close(out[vocab["dog"]], expected, "peer_same_order")


def test_the_tokenizer_and_chat_template_are_written(models, tmp_path):
    base, a, b = models
    recipe = f"""
merge_method: linear
models: [{base}, {a}, {b}]
parameters: {{weight: 1.0}}
tokenizer_source: union
chat_template: auto
dtype: float32
"""
    merge(recipe, tmp_path / "out", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert {"cat", "dog", "fish", "<|im_start|>", "w3"} <= set(tok.get_vocab())
    assert tok.chat_template.strip() == TEMPLATE.strip()  # two of three models carry it
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "user: hi\n"
    own = """{% for m in messages %}[{{ m['content'] }}]{% endfor %}"""
    merge(recipe.replace("chat_template: auto", f"chat_template: {json.dumps(own)}"), tmp_path / "own", progress=False)
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "own")).chat_template == own


def test_chat_template_alone_keeps_the_embeddings_and_sets_the_template(models, tmp_path):
    base, a, _ = models
    recipe = f"""
merge_method: linear
models: [{base}, {a}]
parameters: {{weight: 1.0}}
chat_template: auto
dtype: float32
"""
    with pytest.raises(RecipeError, match="tensor 'model.embed_tokens.weight': shape"):
        plan_merge(recipe)  # a has 2 more tokens: without a tokenizer merge the shapes differ
    same = recipe.replace(str(a), str(base) + "2")
    shutil.copytree(base, str(base) + "2")
    merge(same, tmp_path / "out", progress=False)
    embed = "model.embed_tokens.weight"
    assert torch.equal(tensors_of(tmp_path / "out")[embed], tensors_of(base)[embed])
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template.strip() == TEMPLATE.strip()


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Why?"},
]
RENDERED = {  # each family's published format, written out by hand, with the generation prompt
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.\n\n### Instruction:\nWhy?\n\n### Response:\n",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST] Hello.</s>[INST] Why? [/INST]",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello.[|endofturn|]\n[|user|]Why?\n"
    "[|assistant|]",
}


@pytest.mark.parametrize("name", list(RENDERED))
def test_a_named_chat_template_renders_its_familys_format(models, tmp_path, name):
    base, _, _ = models
    shutil.copytree(base, tmp_path / "twin")
    recipe = f"merge_method: linear\nmodels: [{base}, {tmp_path / 'twin'}]\nparameters: {{weight: 1.0}}\n"
    merge(recipe + f"chat_template: {name}\n", tmp_path / "out", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == RENDERED[name]


def test_the_exaone_template_adds_an_empty_system_turn_and_mistral_checks_roles(models, tmp_path):
    base, _, _ = models
    shutil.copytree(base, tmp_path / "twin")
    recipe = f"merge_method: linear\nmodels: [{base}, {tmp_path / 'twin'}]\nparameters: {{weight: 1.0}}\n"
    for name in ("exaone", "mistral"):
        merge(recipe + f"chat_template: {name}\n", tmp_path / name, progress=False)
    exaone = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "exaone"))
    assert exaone.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "[|system|][|endofturn|]\n[|user|]Hi\n"
    mistral = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "mistral"))
    with pytest.raises(Exception, match="roles must alternate"):
        mistral.apply_chat_template(CONVERSATION[1:2] * 2, tokenize=False)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("tokenizer_source: union\ntokenizer: {source: union}", "not both"),
        ("tokenizer_source: 7", "tokenizer_source: expected"),
        ("tokenizer: {source: union, pad_to_multiple_of: 0}", "pad_to_multiple_of"),
        ("tokenizer: {source: union, colour: red}", "tokenizer.colour"),
        ("tokenizer: {tokens: {x: {source: {kind: sideways}}}}", "tokenizer.tokens.x.source"),
        ("tokenizer: {tokens: {x: {source: {kind: model_token, model: m}}}}", "token_id or token"),
        ("chat_template: vicuna", "chat_template: expected 'auto', one of"),
    ],
)
def test_bad_tokenizer_settings_are_refused_by_name(models, extra, message):
    base, a, _ = models
    with pytest.raises(RecipeError, match=message):
        plan_merge(f"merge_method: linear\nmodels: [{base}, {a}]\nparameters: {{weight: 1.0}}\n{extra}\n")


def test_without_transformers_the_error_names_the_extra(models, monkeypatch):
    base, a, _ = models
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers fails
    with pytest.raises(RecipeError, match=r"pip install 'fusion-kernels\[tokenizer\]'"):
        plan_merge(
            f"merge_method: linear\nmodels: [{base}, {a}]\nparameters: {{weight: 1.0}}\ntokenizer_source: union\n"
        )


def test_an_lm_head_bias_is_aligned_like_its_weight(models):
    from modelfusion.io.vocabulary import TokenizerSpec, build_vocabulary

    base, a, b = models
    vocabulary = build_vocabulary(TokenizerSpec("union", {}), base, [base, a, b])
    sizes = {p: len(vocab_of(p)) for p in (base, a, b)}
    assert all(vocabulary.indexes(p, "lm_head.bias", (sizes[p],)) for p in (base, a, b))
    assert not vocabulary.indexes(a, "model.norm.weight", (sizes[a],))
    biases = [torch.arange(sizes[p], dtype=torch.float32) + 100 * k for k, p in enumerate((base, a, b))]
    aligned = vocabulary.align(biases)
    vocab = vocabulary.vocab
    assert aligned[2][vocab["fish"]] == 200 + vocab_of(b)["fish"]  # b's own entry
    assert aligned[0][vocab["fish"]] == 200 + vocab_of(b)["fish"]  # base lacks it: from b, its only holder
    assert aligned[2][vocab["w3"]] == vocab_of(base)["w3"]  # b lacks it: the base's


def test_a_chat_template_for_a_model_without_a_tokenizer_is_refused_before_writing(tmp_path):
    from modelfusion.demos.streaming import make_llama_family
    from modelfusion.errors import CheckpointError

    base, tuned = make_llama_family(tmp_path / "family", 1, torch.float32, hidden=32, layers=1, intermediate=48)
    recipe = f"merge_method: linear\nmodels: [{base}, {tuned}]\nparameters: {{weight: 1.0}}\nchat_template: chatml\n"
    with pytest.raises(CheckpointError, match="cannot load its tokenizer: it has no tokenizer.json"):
        merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
