"""Training: data windows, loss, schedule, the book's loop, reproducibility, exact resume, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from book_reference import GPTModel as BookGPTModel
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler
from conftest import REPO

from modelkit import build_model
from modelkit.weights.checkpoint import load_checkpoint
from modelkit.cli import main
from modelkit.generation import generate
from modelkit.training.dataset import DataError, GPTDatasetV1, ShardedBatchSampler, split_text
from modelkit.testing import synthetic_text, tiny_model_spec
from modelkit.tokenizer import get_tokenizer
from modelkit.training import TrainConfig, TrainError, calc_loss_batch, lr_at, train



def small_vocab_ids(n_sentences: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """GPT-2 ids of synthetic text renumbered 0..k-1 (k ≈ 50 words): text-like data for a tiny vocab."""
    ids = get_tokenizer().encode(synthetic_text(n_sentences, seed))
    order = {tid: i for i, tid in enumerate(sorted(set(ids)))}
    return torch.tensor([order[t] for t in ids]), len(order)


# -- data ----------------------------------------------------------------------------------------

def test_dataset_windows_are_the_books_by_hand():
    # 10 tokens, max_length 4, stride 3: starts 0 and 3 (the book stops below 10 - 4 = 6)
    ds = GPTDatasetV1(list(range(10)), max_length=4, stride=3)
    assert len(ds) == 2
    assert ds[0][0].tolist() == [0, 1, 2, 3] and ds[0][1].tolist() == [1, 2, 3, 4]
    assert ds[1][0].tolist() == [3, 4, 5, 6] and ds[1][1].tolist() == [4, 5, 6, 7]


def test_dataset_tokenises_text_with_gpt2():
    text = "Every effort moves you forward, one token at a time."
    ids = get_tokenizer().encode(text)
    ds = GPTDatasetV1(text, max_length=4, stride=4)
    assert ds[1][0].tolist() == ids[4:8] and ds[1][1].tolist() == ids[5:9]


def test_split_text_is_the_books_character_split():
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train_text, val_text = split_text(text, 0.1)
    assert train_text == text[:900] and val_text == text[900:]


def test_sharded_batches_match_torch_distributed_sampler():
    n, per_rank, world, seed = 37, 3, 2, 5
    epoch_batches = n // (per_rank * world)
    for rank in range(world):
        mine = list(ShardedBatchSampler(n, per_rank, rank=rank, world_size=world, seed=seed, start=epoch_batches,
                                        stop=2 * epoch_batches))  # the second epoch
        reference = DistributedSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        reference.set_epoch(1)
        ref = list(reference)
        assert mine == [ref[k * per_rank:(k + 1) * per_rank] for k in range(epoch_batches)]


def test_ranks_together_see_the_single_process_batch():
    single = list(ShardedBatchSampler(40, 4, seed=1, stop=20))
    ranks = [list(ShardedBatchSampler(40, 2, rank=r, world_size=2, seed=1, stop=20)) for r in range(2)]
    for k, batch in enumerate(single):
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(batch)
        assert not set(ranks[0][k]) & set(ranks[1][k])


def test_batch_order_ignores_the_global_rng():
    torch.manual_seed(0)
    a = list(ShardedBatchSampler(30, 2, seed=3, stop=30))
    torch.manual_seed(99)
    b = list(ShardedBatchSampler(30, 2, seed=3, stop=30))
    assert a == b


# -- loss, initialisation, schedule ----------------------------------------------------------------

def test_loss_is_mean_token_cross_entropy_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    model = torch.nn.Identity()
    by_hand = -sum(logits[b, s].exp().div(logits[b, s].exp().sum()).log()[targets[b, s]]
                   for b in range(2) for s in range(5)) / 10
    assert calc_loss_batch(logits, targets, model).item() == pytest.approx(by_hand.item(), rel=1e-6)


@pytest.mark.parametrize("init, logit_var", [("gpt2", 64 * 0.02**2), ("default", 1 / 3)])
def test_untrained_loss_is_ln_vocab_plus_half_the_logit_variance(init, logit_var):
    # Logits of an untrained model are ~N(0, σ²) and independent of the target, so the expected loss
    # is E[logsumexp] ≈ ln V + σ²/2. gpt2 init: σ² = emb·0.02²; PyTorch's Linear default: σ² = 1/3.
    spec = tiny_model_spec(emb_dim=64, init=init)
    torch.manual_seed(1)
    model = build_model(spec).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50257, (4, 33), generator=g)
    with torch.no_grad():
        loss = calc_loss_batch(ids[:, :-1], ids[:, 1:], model).item()
    assert loss == pytest.approx(math.log(50257) + logit_var / 2, abs=0.05)


def test_gpt2_init_scales_residual_projections():
    spec = tiny_model_spec(emb_dim=64, n_layers=4, init="gpt2")
    torch.manual_seed(0)
    model = build_model(spec)
    block = model.trf_blocks[0]
    assert block.att.W_query.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.ff.layers[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.02)
    residual = 0.02 / math.sqrt(2 * 4)
    assert block.ff.layers[2].weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.att.out_proj.weight.std().item() == pytest.approx(residual, rel=0.1)
    assert block.ff.layers[0].bias.abs().max().item() == 0.0
    assert torch.equal(block.norm1.scale, torch.ones(64))


def test_schedule_warmup_then_cosine_by_hand():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2)
    lrs = [lr_at(s, cfg, total_steps=10) for s in range(10)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[2] == pytest.approx(1e-3)  # cosine starts at the peak ...
    assert lrs[9] == pytest.approx(1e-4)  # ... and reaches min_lr at the last step
    # step 5: progress (5-2)/7 -> 1e-4 + 0.5 * 9e-4 * (1 + cos(3π/7))
    assert lrs[5] == pytest.approx(1e-4 + 0.45e-3 * (1 + math.cos(3 * math.pi / 7)))
    assert lr_at(7, TrainConfig(lr=1e-3), 10) == 1e-3  # no min_lr: constant


# -- the loop -------------------------------------------------------------------------------------

def book_windows(ids: torch.Tensor, max_length: int, stride: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ids[i:i + max_length], ids[i + 1:i + max_length + 1]) for i in range(0, len(ids) - max_length, stride)]


def book_batches(windows, batch_size, drop_last):
    out = []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        if len(chunk) < batch_size and drop_last:
            break
        out.append((torch.stack([w[0] for w in chunk]), torch.stack([w[1] for w in chunk])))
    return out


def book_train_model_simple(model, train_batches, val_batches, optimizer, num_epochs, eval_freq, eval_iter):
    """The book's train_model_simple (chapter 5) over lists of batches (its DataLoaders, shuffle=False)."""
    def loss_of(x, y):
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def loss_loader(batches, n):
        n = min(n, len(batches))
        return sum(loss_of(x, y).item() for x, y in batches[:n]) / n

    step_losses, evals, global_step = [], [], -1
    for _ in range(num_epochs):
        model.train()
        for x, y in train_batches:
            optimizer.zero_grad()
            loss = loss_of(x, y)
            loss.backward()
            optimizer.step()
            step_losses.append(loss.item())
            global_step += 1
            if global_step % eval_freq == 0:
                model.eval()
                with torch.no_grad():
                    evals.append((global_step + 1, loss_loader(train_batches, eval_iter), loss_loader(val_batches, eval_iter)))
                model.train()
    return step_losses, evals


def test_training_matches_the_books_loop():
    ids, vocab = small_vocab_ids(60)
    train_ids, val_ids = ids[:-200], ids[-200:]
    cfg_dict = {"vocab_size": vocab, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                "drop_rate": 0.0, "qkv_bias": False}
    batch, epochs, eval_freq, eval_iter = 2, 2, 5, 2
    train_batches = book_batches(book_windows(train_ids, 16, 16), batch, drop_last=True)
    val_batches = book_batches(book_windows(val_ids, 16, 16), batch, drop_last=False)
    torch.manual_seed(123)
    book_model = BookGPTModel(cfg_dict)
    optimizer = torch.optim.AdamW(book_model.parameters(), lr=4e-4, weight_decay=0.1)
    book_losses, book_evals = book_train_model_simple(book_model, train_batches, val_batches, optimizer, epochs,
                                                      eval_freq, eval_iter)

    config = TrainConfig(epochs=epochs, batch_size=batch, lr=4e-4, weight_decay=0.1, shuffle=False, seed=123,
                         eval_every=1, eval_batches=eval_iter)
    result = train(cfg_dict, train_ids, config, val_data=val_ids, progress=False)
    assert len(result.losses()) == len(book_losses) == epochs * len(train_batches)
    print("max |loss difference| vs the book's loop:",
          max(abs(a - b) for a, b in zip(result.losses(), book_losses)))
    assert result.losses() == pytest.approx(book_losses, abs=1e-4)
    by_step = {m["step"]: m for m in result.metrics}
    for step, train_loss, val_loss in book_evals:
        assert by_step[step]["train_eval_loss"] == pytest.approx(train_loss, abs=1e-4)
        assert by_step[step]["val_loss"] == pytest.approx(val_loss, abs=1e-4)
    assert book_losses[-1] < book_losses[0] - 0.2  # it learns something


def test_same_seed_same_losses_and_other_seed_other_losses():
    ids, vocab = small_vocab_ids(40)
    spec = tiny_model_spec(vocab_size=vocab, context_length=16, drop_rate=0.1)
    config = TrainConfig(steps=6, batch_size=2, eval_every=100)
    a = train(spec, ids, config, progress=False).losses()
    b = train(spec, ids, config, progress=False).losses()
    c = train(spec, ids, TrainConfig(steps=6, batch_size=2, eval_every=100, seed=7), progress=False).losses()
    assert a == b
    assert a != c


def test_logged_grad_norm_is_the_total_gradient_norm():
    ids, vocab = small_vocab_ids(30)
    spec = tiny_model_spec(vocab_size=vocab, context_length=16)
    config = TrainConfig(steps=1, batch_size=3, shuffle=False, grad_clip=0.5, seed=4, eval_every=100)
    result = train(spec, ids, config, val_data=ids[:40], progress=False)
    torch.manual_seed(4)
    model = build_model(spec)
    x = torch.stack([ids[i * 16:(i + 1) * 16] for i in range(3)])
    y = torch.stack([ids[i * 16 + 1:(i + 1) * 16 + 1] for i in range(3)])
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    expected = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
    assert result.metrics[1]["grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_resume_is_exact(tmp_path):
    ids, vocab = small_vocab_ids(40)
    spec = tiny_model_spec(vocab_size=vocab, context_length=16, drop_rate=0.1)
    config = TrainConfig(steps=8, batch_size=4, lr=1e-3, warmup_steps=2, min_lr=1e-4, grad_clip=1.0,
                         eval_every=3, save_every=4)
    straight = train(spec, ids, config, out_dir=tmp_path / "a", progress=False)
    first = train(spec, ids, config, out_dir=tmp_path / "b", pause_at=4, progress=False)
    second = train(None, ids, out_dir=tmp_path / "b", resume=tmp_path / "b", progress=False)
    assert first.step == 4 and second.step == 8
    assert first.losses() + second.losses() == straight.losses()
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [m["step"] for m in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(9))


def test_checkpoint_folder_holds_safetensors_and_json_only(tmp_path):
    ids, vocab = small_vocab_ids(30)
    spec = tiny_model_spec(vocab_size=vocab, context_length=16)
    result = train(spec, ids, TrainConfig(steps=2, batch_size=2, eval_every=1), out_dir=tmp_path, progress=False)
    folder = tmp_path / "checkpoints" / "step_000002"
    assert result.checkpoint == folder
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "train_state.json",
                                                       "train_state.safetensors"]
    state = json.loads((folder / "train_state.json").read_text())
    assert state["step"] == 2 and state["tokens"] == 2 * 2 * 16
    tensors = load_file(str(folder / "train_state.safetensors"))
    assert "rng.torch.rank0" in tensors
    assert {k.rsplit(".", 1)[1] for k in tensors if k.startswith("optimizer.")} == {"step", "exp_avg", "exp_avg_sq"}
    final = load_checkpoint(tmp_path / "model.safetensors")
    for (name, a), b in zip(result.model.state_dict().items(), final.state_dict().values()):
        assert torch.equal(a, b), name
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s"} <= set(lines[-1])


def test_resume_refuses_a_different_global_batch_or_data(tmp_path):
    ids, vocab = small_vocab_ids(30)
    spec = tiny_model_spec(vocab_size=vocab, context_length=16)
    train(spec, ids, TrainConfig(steps=2, batch_size=2, eval_every=5), out_dir=tmp_path, progress=False)
    with pytest.raises(TrainError, match="global batch of 2"):
        train(None, ids, TrainConfig(steps=4, batch_size=3), resume=tmp_path, progress=False)
    with pytest.raises(TrainError, match="training data differ"):
        train(None, ids.flip(0), resume=tmp_path, progress=False)


def test_bad_data_gets_a_clear_error():
    spec = tiny_model_spec(vocab_size=97, context_length=16)
    with pytest.raises(DataError, match="not enough for one window"):
        train(spec, torch.arange(10), TrainConfig(steps=1), progress=False)
    with pytest.raises(DataError, match="token id 1[0-9][0-9], outside the model.s vocabulary 0..96"):
        train(spec, torch.arange(201), TrainConfig(steps=1), progress=False)
    with pytest.raises(TrainError, match="steps or epochs, not both"):
        TrainConfig(steps=1, epochs=1)


@pytest.mark.parametrize("fields, problem", [
    ({"steps": True}, "steps must be an integer, got true"),
    ({"batch_size": "4"}, 'batch_size must be an integer, got "4"'),
    ({"lr": "1e-3"}, 'lr must be a number, got "1e-3"'),
    ({"shuffle": 1}, "shuffle must be a boolean (true or false), got 1"),
    ({"betas": [0.9, "0.99"]}, 'betas[1] must be a number, got "0.99"'),
    ({"stpes": 3}, "unknown field 'stpes'; did you mean 'steps'?"),
    ({"steps": 0}, "steps must be a positive integer, got 0"),
])
def test_train_config_takes_json_types_and_known_fields_only(fields, problem):
    with pytest.raises(TrainError) as exc:
        TrainConfig(**fields)
    assert str(exc.value).startswith("invalid training config: ") and problem in str(exc.value)
    with pytest.raises(TrainError, match="invalid training config: "):
        TrainConfig.from_dict({**TrainConfig().to_dict(), **fields})


def test_train_config_round_trips_through_json_and_takes_an_integer_for_a_float():
    config = TrainConfig(steps=3, lr=1, betas=[0.8, 0.9], min_lr=0, plot=True)
    assert (config.lr, config.betas, config.min_lr) == (1.0, (0.8, 0.9), 0.0)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# -- the CLI ----------------------------------------------------------------------------------------

def test_cli_trains_resumes_and_plots(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_model_spec(name="tiny")))
    data = tmp_path / "text.txt"
    data.write_text(synthetic_text(120), encoding="utf-8")
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--lr", "1e-2", "--eval-every", "4", "--quiet"]
    assert main([*args, "--steps", "10", "--pause-at", "4"]) == 0
    assert main(["train", "--resume", str(out), "--data", str(data), "--plot", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "trained 4 steps" in printed and "whole run:    steps 1-10, " in printed
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(11))
    evals = [m["val_loss"] for m in lines if "val_loss" in m]
    assert evals[-1] < evals[0] - 1.0  # validation loss falls on the held-out 10%
    assert (out / "loss.png").stat().st_size > 1000
    assert load_checkpoint(out / "model.safetensors").spec.name == "tiny"


def test_cli_trains_a_llama_style_spec_resumes_it_exactly_and_generates_from_it(tmp_path, capsys):
    """RoPE, RMSNorm, grouped-query attention and SwiGLU (the llama plugin's parts) through the whole
    CLI: train, pause, resume to the weights of an uninterrupted run, then generate from the run
    folder and from its last checkpoint folder the text of greedy decoding by hand."""
    pytest.importorskip("modelkit_llama")
    spec = json.loads((REPO / "configs" / "llama-style.json").read_text())
    spec.update(name="llama-tiny", context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    spec["attention"]["num_kv_heads"] = 2
    spec["feedforward"]["hidden_dim"] = 64
    config, data = tmp_path / "llama.json", tmp_path / "text.txt"
    config.write_text(json.dumps(spec))
    data.write_text(synthetic_text(40), encoding="utf-8")
    args = ["train", "--config", str(config), "--data", str(data), "--batch-size", "2", "--lr", "1e-2",
            "--steps", "4", "--eval-every", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--out", str(tmp_path / "run"), "--pause-at", "2"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "model.safetensors").is_file()
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    model = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert (model.spec.positional.type, model.spec.norm.type, model.spec.attention.type, model.spec.feedforward.type) \
        == ("llama.rope", "llama.rmsnorm", "llama.gqa", "llama.swiglu")
    straight = load_checkpoint(tmp_path / "straight" / "model.safetensors").state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, straight[name]), name
    tokenizer = get_tokenizer()
    prompt = torch.tensor([tokenizer.encode("the old painter")])
    expected = tokenizer.decode(generate(model.eval(), prompt, max_new_tokens=6)[0].tolist())
    capsys.readouterr()
    for source in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_000004"):
        assert main(["generate", "--checkpoint", str(source), "--prompt", "the old painter",
                     "--max-new-tokens", "6"]) == 0
        assert capsys.readouterr().out.strip() == expected.strip()
    assert main(["generate", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--prompt", "a"]) == 2
    assert "holds no model.safetensors" in capsys.readouterr().err


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_model_spec()))
    assert main(["train", "--config", str(config), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "data file not found" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    assert main(["train", "--config", str(config), "--data", str(short), "--quiet"]) == 2
    assert "not enough for one window" in capsys.readouterr().err


def _tiny_run(tmp_path, steps: int = 4, pause_at: int = 2, *extra: str):
    """A paused CLI run of the tiny spec on a small text file: (args prefix, run folder, text file)."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_model_spec(name="tiny")))
    data = tmp_path / "text.txt"
    data.write_text(synthetic_text(60), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(out), "--batch-size", "2",
                 "--lr", "1e-2", "--eval-every", "100", "--steps", str(steps), "--pause-at", str(pause_at),
                 "--quiet", *extra]) == 0
    return out, data


def test_cli_resume_needs_only_the_run_folder_and_reports_session_and_whole_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, data = _tiny_run(tmp_path)
    state = json.loads((out / "checkpoints/step_000002/train_state.json").read_text())
    assert state["data"]["path"] == str(data)  # absolute, as given
    capsys.readouterr()
    assert main(["train", "--resume", "run", "--quiet"]) == 0  # no --data: the recorded file
    captured = capsys.readouterr()
    assert "resume:" not in captured.err  # nothing changed, nothing to report
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 4]
    val = {m["step"]: m["val_loss"] for m in lines if "val_loss" in m}
    assert sorted(val) == [0, 2, 4]  # the start, the pause, the end
    printed = captured.out.splitlines()
    assert printed[0].startswith("this session: steps 3-4, 128 tokens, ")  # 2 steps x 2 windows x 32 tokens
    assert printed[0].endswith(f"; validation loss {val[2]:.3f} (step 2) -> {val[4]:.3f} (step 4)")
    assert printed[1].startswith("whole run:    steps 1-4, 256 tokens, ")
    assert printed[1].endswith(f"; validation loss {val[0]:.3f} (step 0) -> {val[4]:.3f} (step 4)")


def test_cli_resume_with_the_data_moved_or_changed(tmp_path, capsys):
    out, data = _tiny_run(tmp_path)
    moved = tmp_path / "moved.txt"
    data.rename(moved)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"modelkit train: error: the run's data file {data} is missing; pass --data FILE with the "
                   "same text"]
    data.write_text(synthetic_text(60, seed=1), encoding="utf-8")  # another text at the recorded path
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert f"training data differ from the data this checkpoint was trained on ({data})" in capsys.readouterr().err
    assert not (out / "checkpoints/step_000004").exists()  # nothing written by the refused runs
    assert main(["train", "--resume", str(out), "--data", str(moved), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "whole run:    steps 1-4" in capsys.readouterr().out
    state = json.loads((tmp_path / "b/checkpoints/step_000004/train_state.json").read_text())
    assert state["data"]["path"] == str(moved)  # the new place is what the new checkpoint records
    steps = [m["step"] for m in map(json.loads, (tmp_path / "b/metrics.jsonl").read_text().splitlines())]
    assert steps == [0, 1, 2, 3, 4]  # a new --out starts from the resumed run's history
    state_file = out / "checkpoints/step_000002/train_state.json"  # as an older modelkit wrote it:
    state = json.loads(state_file.read_text())
    del state["data"]["path"]
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"modelkit train: error: the checkpoint in {out} does not record its data file "
                                       "(an older modelkit wrote it); pass --data FILE with the text it was trained on\n")


def test_cli_train_without_data_is_one_clear_error(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_model_spec()))
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    assert capsys.readouterr().err == "modelkit train: error: give --data FILE, the text to train on\n"


def test_cli_resume_prints_a_changed_learning_rate_and_when_the_schedule_changes(tmp_path, capsys):
    out, _ = _tiny_run(tmp_path, 4, 2, "--min-lr", "1e-3")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--lr", "5e-3", "--quiet"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resume:")]
    # cosine from lr to min_lr over steps 0..3 (0-based); step 3 in metrics.jsonl is index 2:
    # progress 2/3, lr = 1e-3 + 0.5 (lr - 1e-3)(1 + cos(2π/3)) = 1e-3 + 0.25 (lr - 1e-3)
    assert err == ["resume: lr 0.01 -> 0.005 from step 3",
                   f"resume: the learning-rate schedule changes from step 3: lr there "
                   f"{1e-3 + 0.25 * 9e-3:.3g} -> {1e-3 + 0.25 * 4e-3:.3g}"]
    lr = [m["lr"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert lr[3] == pytest.approx(2e-3)  # what the message said step 3 would use


def test_resume_changes_name_each_setting_and_only_true_schedule_changes():
    from modelkit.training import resume_changes

    def saved(config: TrainConfig, step: int, total: int) -> dict:
        return {"config": config.to_dict(), "step": step, "total_steps": total, "world_size": 1}

    flat = TrainConfig(lr=1e-3, batch_size=4)
    assert resume_changes(saved(flat, 5, 10), flat, 10, 1) == []
    # a longer run at a constant rate: the run length changes, the rate of every step does not
    assert resume_changes(saved(flat, 10, 10), flat, 20, 1) == ["steps 10 -> 20 from step 11"]
    assert resume_changes(saved(flat, 5, 10), TrainConfig(lr=1e-3, batch_size=2, grad_clip=1.0, eval_every=7), 10,
                          2) == ["processes 1 -> 2 from step 6 (batch_size per process 4 -> 2, the same global batch)",
                                 "grad_clip None -> 1 from step 6", "eval_every 50 -> 7 from step 6"]
    # the README's recipe (lr 3e-3 -> 3e-4, warm-up 10, 200 steps) stopped at 64, resumed with lr 1e-3:
    cosine = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10)
    progress = (64 - 10) / (200 - 10 - 1)
    before = 3e-4 + 0.5 * 2.7e-3 * (1 + math.cos(math.pi * progress))
    after = 3e-4 + 0.5 * 0.7e-3 * (1 + math.cos(math.pi * progress))
    assert resume_changes(saved(cosine, 64, 200), cosine.replace(lr=1e-3), 200, 1) == [
        "lr 0.003 -> 0.001 from step 65",
        f"the learning-rate schedule changes from step 65: lr there {before:.3g} -> {after:.3g}"]
    # a finished cosine run made longer: the rate rises again from min_lr
    longer = 3e-4 + 0.5 * 2.7e-3 * (1 + math.cos(math.pi * (200 - 10) / (400 - 10 - 1)))
    assert resume_changes(saved(cosine, 200, 200), cosine, 400, 1) == [
        "steps 200 -> 400 from step 201",
        f"the learning-rate schedule changes from step 201: lr there 0.0003 -> {longer:.3g}"]


def test_train_records_the_data_file_it_is_told_and_never_reads_it(tmp_path, monkeypatch):
    from modelkit.training import read_train_state, recorded_data_path

    monkeypatch.chdir(tmp_path)
    ids, vocab = small_vocab_ids(30)
    spec = tiny_model_spec(vocab_size=vocab, context_length=16)
    config = TrainConfig(steps=2, batch_size=2, eval_every=5)
    train(spec, ids, config, out_dir="a", data_path="no/such/file.txt", pause_at=1, progress=False)
    assert recorded_data_path("a") == str(tmp_path / "no/such/file.txt")
    train(None, ids, out_dir="a", resume="a", progress=False)  # the ids, not the (missing) file
    assert read_train_state("a")["step"] == 2 and recorded_data_path("a") == str(tmp_path / "no/such/file.txt")
    train(spec, ids, config, out_dir="b", progress=False)
    assert recorded_data_path("b") is None


# -- plots ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers", [2, 3])
def test_grad_norm_plot_ticks_layers_at_whole_numbers(n_layers):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from modelkit.training.plots import grad_norms_figure

    fig = grad_norms_figure({"pre_norm": [0.5 ** i for i in range(n_layers)], "post_norm": [1.0] * n_layers})
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(t == round(t) for t in ticks), ticks
        assert set(range(1, n_layers + 1)) >= {round(t) for t in ticks}
    finally:
        plt.close(fig)
