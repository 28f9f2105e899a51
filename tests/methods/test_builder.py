import pytest
import torch
import torch.nn as nn

from kdengine.methods import LOSS_KINDS, Method, build_method, list_methods, method_options

from .fakes import FakeNet, batch, run

BASES = ["vanilla", "dml", "kdcl", "switokd", "kd", "dkd", "fitnet"]
OFFLINE = ("kd", "dkd", "fitnet")
HETERO = ["pat", "ofa"]  # zoo models only (no +adm): tests/methods/test_pat.py, test_ofa.py


def test_list_methods():
    assert list_methods() == sorted(BASES + [f"{b}+adm" for b in BASES] + HETERO)


def _models(roles):
    return [FakeNet((4, 8, 16) if r == "teacher" else (4, 8, 8)).double() for r in roles]


@pytest.mark.parametrize("name", [n for n in list_methods() if n not in HETERO])
@pytest.mark.parametrize(
    "roles", [("teacher", "student"), ("student", "teacher"), ("teacher", "student", "student"),
              ("teacher", "teacher", "student")],
    ids=["1T1S", "1S1T", "1T2S", "2T1S"],
)
def test_every_method_runs_and_total_is_the_sum_of_its_loss_terms(name, roles):
    if name.split("+")[0] in OFFLINE and roles.count("teacher") > 1:
        pytest.skip("offline methods take one teacher")
    models = _models(roles)
    method = build_method(name, models, roles=roles, num_classes=7, num_samples=16)
    assert isinstance(method, Method) and method.name == name
    assert method.topology == f"{roles.count('teacher')}T{roles.count('student')}S"
    offline = name.split("+")[0] in OFFLINE
    # the method owns only its own parameters (connectors, regressors), never the models'
    model_params = {id(p) for mm in models for p in mm.parameters()}
    assert not model_params & {id(p) for p in method.parameters()}
    assert method.trainable == tuple(not (offline and r == "teacher") for r in roles)
    x, y = batch()
    method.double().start_epoch(0, 2)
    outs = run(models, method.trainable, x.double())
    out = method(outs, y, indices=torch.arange(6))
    assert out.total.dim() == 0 and out.total.requires_grad
    assert all(not v.requires_grad for v in out.terms.values())
    want = sum(v for k, v in out.terms.items() if k.split("/")[0] in LOSS_KINDS)
    torch.testing.assert_close(out.total.detach(), want)
    out.total.backward()
    for m, t in zip(models, method.trainable):
        grads = [p.grad for p in m.parameters()]
        if t:
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:  # the frozen offline teacher gets nothing
            assert all(g is None for g in grads)


def test_defaults_follow_the_papers():
    o = method_options("dml+adm")
    assert o["preset"] == "cifar" and o["dml"] == {"weight": 1.0, "temperature": 1.0}
    assert (o["adm"]["alpha"], o["adm"]["beta"], o["adm"]["gamma"]) == (0.01, 0.01, 1.0)
    assert (o["adm"]["co"], o["adm"]["di"]) == ("ce", "ce")
    o = method_options("switokd+adm", preset="imagenet")
    assert (o["adm"]["alpha"], o["adm"]["beta"], o["adm"]["gamma"]) == (0.2, 0.6, 0.01)
    o = method_options("kd+adm")
    assert (o["adm"]["alpha"], o["adm"]["beta"], o["adm"]["gamma"]) == (1.0, 0.0, 0.0)
    assert o["kd"] == {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0}
    o = method_options("kd+adm", preset="imagenet")
    assert (o["adm"]["alpha"], o["adm"]["beta"], o["adm"]["gamma"]) == (0.1, 0.0, 0.0)
    assert o["kd"] == {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 1.0}
    assert method_options("dkd")["dkd"] == {
        "ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20}
    assert method_options("fitnet")["fitnet"]["feat_weight"] == 100.0
    assert method_options("kdcl")["kdcl"]["ensemble"] == "minlogit"
    assert "adm" not in method_options("dml")


def test_options_override_and_none_means_default():
    o = method_options("dml+adm", adm={"alpha": 0.5, "di": "kd"}, temperature=2.0, preset=None, dml=None)
    assert o["adm"]["alpha"] == 0.5 and o["adm"]["beta"] == 0.01 and o["adm"]["di"] == "kd"
    assert o["dml"]["temperature"] == 2.0
    m = build_method("dkd", [nn.Module(), nn.Module()], roles=("teacher", "student"), num_classes=5,
                     dkd={"beta": 6.0}, temperature=2.0)
    assert (m.beta, m.temperature, m.alpha) == (6.0, 2.0, 1.0)


def _raises(match, **kw):
    args = dict(name="dml", models=[nn.Module(), nn.Module()], roles=("teacher", "student"), num_classes=5)
    args.update(kw)
    name, models = args.pop("name"), args.pop("models")
    with pytest.raises(ValueError, match=match):
        build_method(name, models, **args)


def test_bad_names_and_options_error_clearly():
    _raises(r"unknown method 'dml\+foo'; available: dkd, dkd\+adm", name="dml+foo")
    _raises(r"unknown method 'adm'", name="adm")
    _raises(r"unknown option\(s\) \['dkd'\] for method 'dml' \(dkd does not apply", dkd={"beta": 1})
    _raises(r"unknown option\(s\) \['adm'\] for method 'dml'", adm={"alpha": 1})
    _raises(r"unknown option\(s\) \['lr'\].*valid: dml, preset, temperature", lr=0.1)
    _raises(r"unknown adm option\(s\) \['alhpa'\]; valid: alpha, beta", name="dml+adm", adm={"alhpa": 1})
    _raises(r"unknown dml option\(s\) \['tau'\]; valid: temperature, weight", dml={"tau": 2})
    _raises(r"unknown option\(s\) \['temperature'\]", name="vanilla", temperature=2.0)
    _raises(r"temperature is given twice", temperature=2.0, dml={"temperature": 3.0})
    _raises(r"preset must be one of \('cifar', 'imagenet'\)", preset="cifar100")
    _raises(r"kdcl ensemble must be one of", name="kdcl", kdcl={"ensemble": "linear"})
    _raises(r"adm beta must be 0 for offline", name="kd+adm", adm={"beta": 0.1},
            models=[FakeNet(), FakeNet()])
    _raises(r"co and di must be one of", name="dml+adm", adm={"co": "mse"}, models=[FakeNet(), FakeNet()])
    _raises(r"needs num_samples", name="dml+adm", adm={"di": "kd"}, models=[FakeNet(), FakeNet()])
    _raises(r"num_classes must be a positive int", num_classes=0)


def test_bad_roles_error_clearly():
    two = [nn.Module(), nn.Module()]
    _raises(r"roles is required", roles=None)
    _raises(r"2 models but 3 roles", roles=("teacher", "student", "student"))
    _raises(r"unknown role\(s\) \['teachr'\]", roles=("teachr", "student"))
    _raises(r"needs two or more models", models=[nn.Module()], roles=("student",))
    _raises(r"needs at least one teacher and one student", name="dml+adm", roles=("student", "student"))
    _raises(r"needs at least one teacher and one student", name="switokd", roles=("teacher", "teacher"))
    _raises(r"exactly one \(frozen\) teacher", name="kd", roles=("teacher", "teacher", "student"),
            models=two + [nn.Module()])
    _raises(r"exactly one \(frozen\) teacher", name="dkd", roles=("student", "student"))
    _raises(r"model 1 \(Module\) has no `stage_channels`", name="dml+adm")
    # vanilla trains a lone model (an offline teacher) with any role
    m = build_method("vanilla", [nn.Module()], roles=("teacher",), num_classes=3)
    assert m.trainable == (True,)


def test_forward_checks_its_inputs():
    models = [FakeNet(), FakeNet()]
    m = build_method("dml+adm", models, roles=("teacher", "student"), num_classes=7, num_samples=6,
                     adm={"di": "kd"})
    assert m.needs_indices
    x, y = batch()
    outs = run(models, m.trainable, x)
    with pytest.raises(ValueError, match="needs the dataset indices"):
        m(outs, y)
    with pytest.raises(ValueError, match="built for 2 models"):
        m(outs[:1], y, indices=torch.arange(6))
    with pytest.raises(ValueError, match=r"target must be \[B\] = \[6\]"):
        m(outs, y[:3], indices=torch.arange(6))
    m = build_method("dml", models, roles=("teacher", "student"), num_classes=5)
    assert not m.needs_indices
    with pytest.raises(ValueError, match=r"model 0 logits must be \[B, 5\], got \(6, 7\)"):
        m(outs, y)


def test_roles_are_defined_once_and_exported():
    import kdengine.methods as methods
    from kdengine.methods import base

    assert methods.ROLES is base.ROLES == ("teacher", "student")
    assert not hasattr(methods, "ADMTerms")


@pytest.mark.parametrize(
    "cls, roles, match",
    [
        ("DML", ("student",), r"DML: needs two or more models, got 1"),
        ("KDCL", ("teacher",), r"KDCL: needs two or more models"),
        ("SwitOKD", ("student", "student"), r"SwitOKD: needs at least one teacher and one student, got roles"),
        ("Vanilla", ("techer",), r"Vanilla: unknown role\(s\) \['techer'\]"),
        ("Vanilla", (), r"Vanilla: needs at least one model"),
    ],
)
def test_each_method_checks_its_roles_when_built_directly(cls, roles, match):
    import kdengine.methods as methods

    with pytest.raises(ValueError, match=match):
        getattr(methods, cls)(roles, 5)
