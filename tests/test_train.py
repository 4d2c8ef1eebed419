"""Training pipeline: loss goes down, exact resume, router-bias balancing, YAML interop, export.

One tiny model is trained once per module (the compile dominates the cost); its corpus is
the committed held-out sample of the real corpus, with a 512-piece tokenizer trained on it.
"""
import dataclasses
import os

import numpy as np
import pytest
import yaml

from deepseek_ms.config import ConfigError, DeepseekConfig
from deepseek_ms.train.config import load_train_config
from helpers import load_in_mindformers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO_ROOT, "tests", "fixtures", "corpus", "heldout.txt")
TRAIN_TINY = os.path.join(REPO_ROOT, "yaml", "train_tiny.yaml")

TINY_MODEL = {
    "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
    "moe_intermediate_size": 16, "num_hidden_layers": 2, "first_k_dense_replace": 1,
    "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "num_nextn_predict_layers": 1,
    "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "seq_length": 32,
    "moe_router_bias_update_rate": 0.01, "moe_aux_loss_coeff": 0.001, "mtp_loss_scaling_factor": 0.3,
    "compute_dtype": "float32", "params_dtype": "float32",
}


def write_train_yaml(folder, **changes):
    """yaml/train_tiny.yaml with the tiny model and the sample corpus (changes: dotted top-level keys)."""
    with open(TRAIN_TINY, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data["model"]["model_config"] = dict(TINY_MODEL)
    data["output_dir"] = str(folder / "out")
    data["runner_config"].update(batch_size=4, stop_step=12)
    data["lr_schedule"].update(learning_rate=1e-2, lr_end=1e-3, warmup_steps=2)
    data["train_dataset"]["data_loader"].update(dataset_dir=os.path.dirname(SAMPLE), train_file="heldout.txt",
                                                eval_file="heldout.txt")
    data["callbacks"] = [{"type": "MFLossMonitor", "per_print_times": 4}]
    data["do_eval"] = False  # the whole-file evaluations cost more than the training; tested directly below
    data.update(changes)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train 3 steps, checkpoint, train on to step 8; then a second Trainer (as after a restart)
    resumes from that checkpoint and trains 4..8 again."""
    from deepseek_ms.train.trainer import Trainer

    folder = tmp_path_factory.mktemp("train")
    rc, tc = load_train_config(write_train_yaml(folder))
    trainer = Trainer(rc, tc, progress=False)
    first = trainer.train(steps=3)
    ckpt = trainer.save_checkpoint()
    rest = trainer.train(steps=8)
    after = {n: p.asnumpy().copy() for n, p in trainer.net.parameters_and_names()}
    restarted = Trainer(rc, dataclasses.replace(tc, resume=True), progress=False)
    resumed = restarted.train(steps=8)  # resume_training: loads the newest checkpoint first
    return {"trainer": trainer, "restarted": restarted, "first": first, "rest": rest, "resumed": resumed,
            "after": after, "ckpt": ckpt, "folder": folder}


def test_short_run_lowers_the_loss(run):
    losses = run["first"] + run["rest"]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0] - 0.3, losses


def test_resume_reproduces_the_uninterrupted_run_exactly(run):
    assert run["resumed"] == run["rest"]
    restarted = run["restarted"]
    assert restarted.step == 8
    for name, param in restarted.net.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), run["after"][name], err_msg=name)


def test_checkpoint_holds_optimizer_state_and_router_biases(run):
    with np.load(run["ckpt"]) as data:
        names = set(data.files)
        assert int(data["meta/step"]) == 3
        assert int(data["opt/global_step"].reshape(-1)[0]) == 3
        biases = [n for n in names if n.endswith("e_score_correction_bias")]
        assert len(biases) == 2  # the MoE layer and the MTP block
        assert all(np.abs(data[n]).max() > 0 for n in biases)  # moved by the balancing rule
        assert any(n.startswith("opt/adam_m.") for n in names) and any(n.startswith("opt/adam_v.") for n in names)


def test_train_step_applies_the_bias_rule(run):
    """bias_e += gamma * sign(mean load - load_e), with the loads of that very step."""
    from deepseek_ms.train.trainer import _inputs

    trainer = run["trainer"]
    routers = [layer.mlp.gate for layer in trainer.forward.routed_layers()]
    before = [r.e_score_correction_bias.asnumpy().copy() for r in routers]
    out = trainer.step_fn(*_inputs(trainer.schedule.batch(trainer.step)))
    loads = out[2].asnumpy()
    assert loads.shape == (2, 4)
    # every token picks top_k experts in each routed layer
    assert np.all(loads.sum(-1) == 4 * 32 * 2 - np.array([0, 4 * 2]))  # the MTP block sees S-1 positions
    gamma = TINY_MODEL["moe_router_bias_update_rate"]
    for r, b0, load in zip(routers, before, loads):
        expected = b0 + gamma * np.sign(load.mean() - load)
        np.testing.assert_allclose(r.e_score_correction_bias.asnumpy(), expected, atol=1e-7)


def test_held_out_perplexity_and_unigram_baseline(run):
    from deepseek_ms.train.data import unigram_perplexity

    trainer = run["trainer"]
    stream = trainer.eval_stream[:1000]
    ppl = trainer.evaluate(stream)
    assert 1.0 < ppl < TINY_MODEL["vocab_size"]
    uni = unigram_perplexity(trainer.train_stream, stream, TINY_MODEL["vocab_size"])
    assert 1.0 < uni < TINY_MODEL["vocab_size"]


def test_export_loads_as_an_hf_folder(run):
    import deepseek_ms
    from deepseek_ms.tokenizer import load_tokenizer

    trainer = run["trainer"]
    folder = trainer.export(str(run["folder"] / "export"))
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json"} <= names
    cfg = DeepseekConfig.from_pretrained(folder)
    assert cfg.num_nextn_predict_layers == 1 and cfg.n_routed_experts == 4
    model = deepseek_ms.load_model(folder)
    ids = trainer.schedule.batch(0)[:1, :16]
    logits = model.logits(ids)
    assert logits.shape == (1, 16, 512) and np.isfinite(logits).all()
    tok = load_tokenizer(folder)
    text = "The tutorial explains lists."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    assert prompt[0] == tok.bos_token_id and tok.decode(prompt[-1:]) == "<|Assistant|>"


def test_bias_balancing_evens_out_a_skewed_router():
    """A router whose weights favour two experts: the aux-loss-free rule alone spreads the load."""
    import mindspore as ms
    from mindspore import nn, ops

    from deepseek_ms.model.moe import Router
    from deepseek_ms.train.step import bias_update
    from deepseek_ms.train.trainer import max_violation

    E, H, N, rate = 8, 16, 512, 0.01
    cfg = DeepseekConfig.from_dict(dict({k: v for k, v in TINY_MODEL.items()
                                          if k not in ("seq_length", "moe_router_bias_update_rate",
                                                       "moe_aux_loss_coeff", "mtp_loss_scaling_factor",
                                                       "params_dtype")},
                                         hidden_size=H, n_routed_experts=E, n_group=4, topk_group=2))
    router = Router(cfg)
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (E, H)).astype(np.float32)
    w[:2] += 0.5  # experts 0 and 1 score high for most tokens
    router.weight.set_data(ms.Tensor(w))
    x = ms.Tensor((rng.normal(0, 1, (N, H)) + 0.5).astype(np.float32))

    class Balance(nn.Cell):
        """Route, count tokens per expert, apply the bias rule in-graph (as TrainStep does)."""

        def __init__(self):
            super().__init__()
            self.router = router

        def construct(self, x):
            idx, _ = self.router(x)
            load = ops.one_hot(idx, E, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32)).sum(1).sum(0)
            bias = self.router.e_score_correction_bias
            return ops.depend(load, ops.assign(bias, bias_update(bias, load, rate)))

    step = ms.jit(Balance())
    violations = [max_violation(step(x).asnumpy()[None]) for _ in range(80)]
    assert violations[0] > 1.5, violations[0]
    assert np.mean(violations[-10:]) < 0.25 * violations[0], violations
    assert np.abs(router.e_score_correction_bias.asnumpy()).max() > 0.1


@pytest.mark.parametrize("changes, fragment", [
    ({"callbacks": [{"type": "EarlyStopping"}]}, "EarlyStopping"),
    ({"optimizer": {"type": "SGD"}}, "optimizer.type"),
    ({"runner_config": {"batch_size": 0, "stop_step": 5}}, "runner_config.batch_size"),
    ({"lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 1e-3, "total_steps": 7}}, "total_steps"),
])
def test_bad_train_sections_are_named(tmp_path, changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_train_config(write_train_yaml(tmp_path, **changes))


def test_train_tiny_yaml_parses():
    rc, tc = load_train_config(TRAIN_TINY)
    assert rc.run_mode == "train" and rc.model.num_nextn_predict_layers == 1
    assert rc.model.topk_method == "noaux_tc" and rc.model.n_shared_experts >= 1
    assert tc.steps > 0 and tc.mtp_loss_weight > 0 and tc.bias_update_rate > 0 and tc.do_eval


def test_train_yaml_loads_unchanged_in_mindformers(tmp_path):
    mf, = load_in_mindformers([{"path": TRAIN_TINY}], tmp_path)
    rc, tc = load_train_config(TRAIN_TINY)
    assert mf["run_mode"] == "train"
    assert mf["runner_config"]["batch_size"] == tc.batch_size
    assert mf["runner_config"]["stop_step"] == tc.steps
    assert mf["optimizer"]["type"] == "AdamW" and tuple(mf["optimizer"]["betas"]) == tc.betas
    assert mf["lr_schedule"]["learning_rate"] == tc.learning_rate
    assert mf["lr_schedule"]["warmup_steps"] == tc.warmup_steps
    mc = mf["model"]["model_config"]
    for key in ("hidden_size", "num_hidden_layers", "n_routed_experts", "num_nextn_predict_layers", "vocab_size"):
        assert mc[key] == getattr(rc.model, key), key
    assert mc["moe_router_bias_update_rate"] == tc.bias_update_rate
    assert mc["mtp_loss_scaling_factor"] == tc.mtp_loss_weight
    assert [cb["type"] for cb in mf["callbacks"]][:2] == ["MFLossMonitor", "CheckpointMonitor"]
