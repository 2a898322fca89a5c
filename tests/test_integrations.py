"""DKM inside other people's code: transformers models, torch.compile, DDP, autocast."""

import os
import socket

import pytest
import torch
from torch import nn

import dkm_param as dp
from dkm_param.dkm.exportable import exportable_parametrizations

transformers = pytest.importorskip("transformers")


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def test_gpt2_conv1d_layers_and_tied_head_round_trip(tmp_path):
    model = gpt2()
    plan = dp.register_dkm(model, dp.Policy.from_notation("fc:4/1"))
    clustered = {r.name: r.module_type for r in plan.clustered()}
    assert sum(t == "Conv1D" for t in clustered.values()) == 8 and "lm_head" in clustered
    assert plan.row("transformer.wte").tied_to == "lm_head"  # the tied embedding follows the head
    tokens = torch.randint(0, 500, (2, 16))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = model(tokens, labels=tokens)
    out.loss.backward()
    opt.step()
    model.eval()
    compressed = dp.finalize(model)
    assert compressed.aliases.get("transformer.wte.weight") == "lm_head.weight"
    path = compressed.save(tmp_path / "gpt2.safetensors")
    fresh = gpt2(seed=1)
    dp.load_compressed(path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, model(tokens).logits)


def test_bert_linear_layers_and_optional_embeddings(tmp_path):
    model = bert()
    plan = dp.register_dkm(model, dp.Policy.from_notation("fc:3/1, emb:4/4"))
    kinds = {r.name: r.kind for r in plan.clustered()}
    assert "embeddings.word_embeddings" in kinds and kinds["encoder.layer.0.attention.self.query"] == "fc"
    without = dp.Policy.from_notation("fc:3/1").plan(bert())
    assert without.row("embeddings.word_embeddings").spec is None
    compressed = dp.finalize(model)
    fresh = bert(seed=1)
    dp.load_compressed(compressed.save(tmp_path / "bert.safetensors"), fresh)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).last_hidden_state, model(ids).last_hidden_state)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))


def test_bf16_autocast_on_cpu_trains_with_finite_gradients():
    model = small_cnn()
    dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=3), small_layer_bits=None))
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    reference = nn.functional.cross_entropy(model(x), y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    grad = model[3].parametrizations.weight.original.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert abs(loss.item() - reference) < 0.05 * abs(reference) + 0.05


def test_bfloat16_weights_train_and_round_trip(tmp_path):
    model = small_cnn().to(torch.bfloat16)
    dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=3), small_layer_bits=None))
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.bfloat16), torch.arange(4)
    nn.functional.cross_entropy(model(x).float(), y).backward()
    assert model[0].parametrizations.weight.original.grad.dtype == torch.bfloat16
    model.eval()
    compressed = dp.finalize(model)
    assert compressed.layers["0.weight"].codebook.dtype == torch.bfloat16
    fresh = small_cnn().to(torch.bfloat16)
    dp.load_compressed(compressed.save(tmp_path / "bf16.safetensors"), fresh)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    eager = small_cnn()
    compiled_model = small_cnn()
    policy = dp.Policy(default=dp.LayerSpec(bits=3), small_layer_bits=None)
    dp.register_dkm(eager, policy)
    dp.register_dkm(compiled_model, policy)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    for _ in range(3):
        losses = []
        for model, opt in zip((eager, compiled), opts):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5 * max(1.0, abs(losses[0]))


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = small_cnn()
    dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=3), small_layer_bits=None))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)  # each rank sees its own data
    for _ in range(3):
        x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    ddp(x)  # the codebooks broadcast from rank 0 at every forward
    books = {n: p.codebook.clone() for n, _, p in exportable_parametrizations(model)}
    torch.save(books, f"{out}/books{rank}.pt")
    if rank == 0:
        model.eval()
        dp.finalize(model).save(f"{out}/rank0.safetensors")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_gloo_keeps_codebooks_identical_across_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    first, second = torch.load(tmp_path / "books0.pt"), torch.load(tmp_path / "books1.pt")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert dp.read_compressed(tmp_path / "rank0.safetensors").layers
