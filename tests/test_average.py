"""modelfusion.average and modelfusion.ensemble: each algorithm against its formula or closed form."""

import pytest
import torch
from helpers import assert_peer_close
from modelfusion import average
from modelfusion.average.fisher import estimate_fisher
from modelfusion.ensemble import Ensemble
from modelfusion.errors import ParameterError, StateDictError
from torch import nn

from fusion_kernels.methods import merge_tensor, tensor_seed


def mlp(seed: int, hidden: int = 16, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def data(seed: int, n: int = 40, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, classes, (n,), generator=g)


def close(a, b, kind="float32_formula"):
    assert_peer_close(a, b, kind)


# --- state dicts ---------------------------------------------------------------------------


def test_missing_extra_and_misshapen_keys_are_named():
    a, b = mlp(0).state_dict(), mlp(1).state_dict()
    del b["2.bias"]
    b["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictError, match=r"models\[1\]: keys differ.*missing '2.bias'.*unexpected 'extra.weight'"):
        average.uniform_soup([a, b])
    c = mlp(2, hidden=8).state_dict()
    with pytest.raises(StateDictError, match=r"models\[1\]\['0.weight'\]: expected shape \(16, 6\).*got \(8, 6\)"):
        average.uniform_soup([a, c])
    with pytest.raises(StateDictError, match="expected an nn.Module or a state dict"):
        average.uniform_soup([a, 3])


def test_integer_buffers_come_from_the_reference_and_inputs_are_untouched():
    models = [nn.BatchNorm1d(4) for _ in range(3)]
    for i, m in enumerate(models):
        m.num_batches_tracked.fill_(10 * (i + 1))
        m.running_mean.fill_(float(i))
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    soup = average.uniform_soup(models)
    assert soup["num_batches_tracked"].item() == 10 and soup["num_batches_tracked"].dtype == torch.int64
    close(soup["running_mean"], torch.full((4,), 1.0))
    for m, b in zip(models, before, strict=True):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k])
    stock = average.merge("task_arithmetic", models[1:], models[0], weight=1.0)
    assert stock["num_batches_tracked"].item() == 10  # the base is the reference


def test_tied_weights_are_merged_once_and_stay_tied():
    class Tied(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.embed = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

    models = [Tied(i) for i in range(3)]
    soup = average.uniform_soup(models)
    assert soup["embed.weight"] is soup["head.weight"]
    close(soup["embed.weight"], sum(m.embed.weight.detach() for m in models) / 3)
    loaded = average.load_merged(models[0], soup)
    assert loaded.head.weight is loaded.embed.weight


def test_dtypes_follow_the_reference():
    a, b = mlp(0), mlp(1).double()
    soup = average.uniform_soup([a, b])
    assert soup["0.weight"].dtype == torch.float32
    close(soup["0.weight"], (a[0].weight.detach() + b[0].weight.detach().float()) / 2)


# --- soups -----------------------------------------------------------------------------------


def test_weighted_soup_and_wise_ft_formulas():
    a, b, c = (mlp(i).state_dict() for i in range(3))
    soup = average.weighted_soup([a, b, c], [1.0, 2.0, 1.0])
    close(soup["0.weight"], (a["0.weight"] + 2 * b["0.weight"] + c["0.weight"]) / 4)
    raw = average.weighted_soup([a, b], [0.5, 2.0], normalize=False)
    close(raw["2.bias"], 0.5 * a["2.bias"] + 2.0 * b["2.bias"])
    close(average.wise_ft(a, b, 0.25)["0.weight"], 0.75 * a["0.weight"] + 0.25 * b["0.weight"])
    with pytest.raises(ParameterError, match="alpha"):
        average.wise_ft(a, b, 1.5)
    with pytest.raises(ParameterError, match="weights: expected 3"):
        average.weighted_soup([a, b, c], [1.0, 2.0])
    with pytest.raises(ParameterError, match="nonzero sum"):
        average.weighted_soup([a, b], [1.0, -1.0])


def test_greedy_soup_is_never_worse_than_its_best_ingredient_on_validation():
    x, y = data(0, n=200)
    template = mlp(0)
    models = [mlp(i) for i in range(6)]
    for i, m in enumerate(models[:3]):  # some useful ingredients, some noise
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(30 + 20 * i):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    def evaluate(state):
        with torch.no_grad():
            return (average.load_merged(template, state)(x).argmax(-1) == y).float().mean().item()

    result = average.greedy_soup(models, evaluate)
    assert result.score >= max(result.scores)
    assert result.score == evaluate(result.state)
    assert result.ingredients[0] == max(range(6), key=lambda i: result.scores[i])
    expected = average.uniform_soup([models[i] for i in result.ingredients])
    for k, v in expected.items():
        close(result.state[k], v)
    result.state["0.weight"].add_(1.0)  # a copy, even for a one-ingredient soup
    assert (
        not torch.equal(result.state["0.weight"], models[result.ingredients[0]][0].weight.detach())
        or len(result.ingredients) > 1
    )


# --- task vectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della_linear"])
def test_model_level_merge_equals_the_pipeline_per_tensor(method):
    base, models = mlp(0), [mlp(i) for i in (1, 2, 3)]
    merged = average.merge(method, models, base, weight=[0.5, 0.3, 0.2], density=0.6, lam=0.8, seed=7)
    params = average.task_vectors.resolve_parameters(method, 3, {"weight": [0.5, 0.3, 0.2], "density": 0.6, "lam": 0.8})
    for key, value in base.state_dict().items():
        expected = merge_tensor(method, value, [m.state_dict()[key] for m in models], params, tensor_seed(7, key))
        assert torch.equal(merged[key], expected), key


def test_task_arithmetic_formula_slerp_and_model_stock():
    base, a, b = (mlp(i).state_dict() for i in range(3))
    ta = average.merge("task_arithmetic", [a, b], base, weight=[1.0, 0.5], lam=0.5)
    close(
        ta["0.weight"],
        base["0.weight"] + 0.5 * ((a["0.weight"] - base["0.weight"]) + 0.5 * (b["0.weight"] - base["0.weight"])),
    )
    end = average.merge("slerp", [a, b], t=1.0)
    close(end["2.weight"], b["2.weight"])
    stock = average.merge("model_stock", [a, b], base)
    assert set(stock) == set(base)


def test_bad_merge_parameters_raise_one_clear_error():
    base, a, b = (mlp(i).state_dict() for i in range(3))
    with pytest.raises(ParameterError, match="'weight' is required"):
        average.merge("ties", [a, b], base, density=0.5)
    with pytest.raises(ParameterError, match=r"density\[1\]: expected a number in \[0.0, 1.0\]"):
        average.merge("ties", [a, b], base, weight=1.0, density=[0.5, 2.0])
    with pytest.raises(ParameterError, match="weight: expected one number or 2"):
        average.merge("ties", [a, b], base, weight=[1.0, 1.0, 1.0])
    with pytest.raises(ParameterError, match="unknown parameters"):
        average.merge("ties", [a, b], base, weight=1.0, t=0.5)
    with pytest.raises(ParameterError, match="expected a base model"):
        average.merge("ties", [a, b], weight=1.0)
    with pytest.raises(ParameterError, match="method: expected one of"):
        average.merge("linear_probe", [a, b], base)
    with pytest.raises(ParameterError, match="slerp: expected two models"):
        average.merge("slerp", [a, b, base], t=0.5)


# --- Fisher ------------------------------------------------------------------------------------


def loop_fisher(model, x, y):
    fisher = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        torch.log_softmax(model(x[i : i + 1]), -1)[0, y[i]].backward()
        for k, p in model.named_parameters():
            fisher[k] += p.grad**2
    return {k: f / len(x) for k, f in fisher.items()}


def test_fisher_estimate_equals_the_per_example_loop():
    model = mlp(0)
    x, y = data(1, n=30)
    fisher = estimate_fisher(model, [(x[:16], y[:16]), (x[16:], y[16:])])
    expected = loop_fisher(model, x, y)
    for k in expected:
        close(fisher[k], expected[k])
    sampled = [estimate_fisher(model, [(x, y)], kind="sampled", seed=s) for s in (3, 3, 4)]
    assert torch.equal(sampled[0]["0.weight"], sampled[1]["0.weight"])
    assert not torch.equal(sampled[0]["0.weight"], sampled[2]["0.weight"])
    with pytest.raises(ParameterError, match="kind"):
        estimate_fisher(model, [(x, y)], kind="true")
    with pytest.raises(ParameterError, match="at least one batch"):
        estimate_fisher(model, [])


class TwiceShared(nn.Module):
    """One linear layer applied twice: its per-example gradient is not one outer product."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.inner, self.head = nn.Linear(6, 6), nn.Linear(6, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


@pytest.mark.parametrize(
    "make", [lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 5)), TwiceShared]
)
def test_fisher_estimate_of_other_layers_and_shared_weights_equals_the_loop(make):
    model = make()
    x, y = data(2, n=20)
    fisher = estimate_fisher(model, [(x, y)])
    expected = loop_fisher(model, x, y)
    for k in expected:
        close(fisher[k], expected[k])


def test_fisher_merge_equal_fishers_average_and_a_dominant_fisher_wins():
    models = [mlp(i) for i in range(3)]
    ones = {k: torch.ones_like(p) for k, p in models[0].named_parameters()}
    merged = average.fisher_merge(models, [ones, ones, ones])
    for k, v in average.uniform_soup(models).items():
        close(merged[k], v)
    big = {k: torch.full_like(p, 1e6) for k, p in models[0].named_parameters()}
    tiny = {k: torch.full_like(p, 1e-6) for k, p in models[0].named_parameters()}
    merged = average.fisher_merge(models, [tiny, big, tiny])
    for k, v in models[1].state_dict().items():
        close(merged[k], v, "float32_fitted")
    with pytest.raises(StateDictError, match="for some models only"):
        average.fisher_merge(models, [ones, ones, {}])
    with pytest.raises(ParameterError, match="fishers: expected 3"):
        average.fisher_merge(models, [ones])


# --- RegMean -----------------------------------------------------------------------------------


def test_regmean_of_least_squares_experts_is_least_squares_on_the_union():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(3, 8, generator=g, dtype=torch.float64)
    experts, batches = [], []
    for i in range(4):
        x = torch.randn(50 + 10 * i, 8, generator=g, dtype=torch.float64) * (1 + i)
        y = x @ true.T + 0.3 * torch.randn(len(x), 3, generator=g, dtype=torch.float64)
        model = nn.Linear(8, 3, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
        experts.append(model)
        batches.append((x, y))
    grams = [
        average.collect_grams(m, [(x[:20], y[:20]), (x[20:], y[20:])])
        for m, (x, y) in zip(experts, batches, strict=True)
    ]
    merged = average.regmean_merge(experts, grams)
    x_all = torch.cat([b[0] for b in batches])
    y_all = torch.cat([b[1] for b in batches])
    close(merged["weight"], torch.linalg.lstsq(x_all, y_all).solution.T, "float64_solve")
    close(grams[0][""], batches[0][0].T @ batches[0][0], "float64_sum")


def test_regmean_alpha_zero_averages_per_input_and_other_tensors_are_averaged():
    models = [mlp(i) for i in range(3)]
    grams = [average.collect_grams(m, [data(i)[0]]) for i, m in enumerate(models)]
    merged = average.regmean_merge(models, grams, alpha=0.0)
    for key, name in (("0.weight", "0"), ("2.weight", "2")):
        d = torch.stack([torch.diagonal(g[name]) for g in grams])  # [models, in]
        ws = torch.stack([m.state_dict()[key].double() for m in models])  # [models, out, in]
        expected = (d[:, None, :] * ws).sum(0) / d.sum(0)
        close(merged[key], expected.float())
    close(merged["2.bias"], sum(m.state_dict()["2.bias"] for m in models) / 3)
    with pytest.raises(StateDictError, match="not an nn.Linear"):
        average.collect_grams(models[0], [data(0)[0]], modules=["1"])
    with pytest.raises(ParameterError, match="alpha"):
        average.regmean_merge(models, grams, alpha=2.0)


def test_regmean_unseen_inputs_fall_back_to_the_average():
    models = [nn.Linear(4, 2) for _ in range(2)]
    x = torch.randn(10, 4)
    x[:, 3] = 0  # input 3 never active
    grams = [average.collect_grams(m, [x]) for m in models]
    merged = average.regmean_merge(models, grams)
    close(merged["weight"][:, 3], (models[0].weight[:, 3] + models[1].weight[:, 3]).detach() / 2)
    assert torch.isfinite(merged["weight"]).all()


# --- SWA / EMA ---------------------------------------------------------------------------------


def test_ema_and_swa_updates_equal_their_formulas():
    a = [torch.randn(5, 3), torch.randn(7)]
    c = [torch.randn(5, 3), torch.randn(7)]
    expected = [0.9 * x + 0.1 * y for x, y in zip(a, c, strict=True)]
    average.ema_update_(a, c, 0.9)
    for x, e in zip(a, expected, strict=True):
        close(x, e)
    expected = [x + (y - x) / 4 for x, y in zip(a, c, strict=True)]
    average.swa_update_(a, c, 3)
    for x, e in zip(a, expected, strict=True):
        close(x, e)
    with pytest.raises(ParameterError, match="decay"):
        average.ema_update_(a, c, 1.5)
    with pytest.raises(StateDictError, match="expected shape"):
        average.ema_update_(a, [c[1], c[0]], 0.5)


@pytest.mark.parametrize("mode", ["ema", "swa"])
def test_averaged_model_matches_torch_swa_utils(mode):
    from torch.optim import swa_utils

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ours = average.averaged_model(model, decay=0.8 if mode == "ema" else None, use_buffers=False)
    theirs = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.8) if mode == "ema" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        x = torch.randn(16, 4)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        close(p, q)
    loader = [torch.randn(32, 4) + 3.0 for _ in range(4)]
    average.update_bn(loader, ours)
    assert ours.module[1].running_mean.abs().sum() > 0  # BatchNorm statistics recomputed from the data


# --- ensembles ---------------------------------------------------------------------------------


def test_ensembles_equal_a_hand_computation():
    members = [mlp(i) for i in range(3)]
    x = data(0, n=12)[0]
    outs = [m(x).detach() for m in members]
    w = [0.5, 0.3, 0.2]
    close(Ensemble(members, w, mode="logits")(x).detach(), sum(wi * o for wi, o in zip(w, outs, strict=True)))
    probs = sum(wi * torch.softmax(o, -1) for wi, o in zip(w, outs, strict=True))
    close(Ensemble(members, [5, 3, 2], mode="probs")(x).detach(), probs)
    votes = torch.zeros(12, 5)
    for wi, o in zip(w, outs, strict=True):
        votes[torch.arange(12), o.argmax(-1)] += wi
    close(Ensemble(members, w, mode="vote")(x), votes)
    assert torch.equal(Ensemble(members, w, mode="vote").predict(x), votes.argmax(-1))
    with pytest.raises(ParameterError, match="mode"):
        Ensemble(members, mode="max")
    with pytest.raises(ParameterError, match="weights"):
        Ensemble(members, [1.0, -1.0, 1.0])


def test_average_demo_merges_beat_the_base():
    from modelfusion.demos.weight_average import run_average_demo

    result = run_average_demo()
    rows = {r["method"]: r for r in result["rows"]}
    base = rows["pre-trained base"]["average"]
    assert rows["individual experts †"]["average"] > base
    for method in ("ties", "RegMean", "Fisher merging", "task_arithmetic", "TSV-M", "Iso-C", "MagMax", "EMR-merging †"):
        assert rows[method]["average"] > base, method
    assert rows["TALL masks λ=0.4 †"]["average"] > rows["uniform soup"]["average"]  # one masked model per task
    assert result["seconds"] < 120
