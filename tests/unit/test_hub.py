"""Hub export: the card, and a real push over HTTP to a stdlib stand-in for the Hub API on 127.0.0.1."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForMaskedLM, PreTrainedTokenizerFast

from neobert_pt import NeoBERTConfig, NeoBERTForMaskedLM
from neobert_pt.hub import CARD_MARKER, build_model_card, main, resolve_source

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]


class StandInHub(BaseHTTPRequestHandler):
    """The endpoints ``create_repo`` + ``upload_folder`` use; committed files are kept in ``server.files``."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, body: dict | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self):
        self._reply(404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append((self.path, self.headers.get("authorization")))
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.path.startswith("/api/repos/create"):
            request = json.loads(body)
            self.server.created.append(request)
            repo = f"{request['organization']}/{request['name']}"
            return self._reply(200, {"url": f"http://127.0.0.1:{self.server.server_port}/{repo}", "name": repo})
        if self.path.startswith("/api/validate-yaml"):
            return self._reply(200, {})
        if parts[:2] == ["api", "models"] and parts[-2] == "branch":
            self.server.branches.append(parts[-1])
            return self._reply(200, {})
        if parts[:2] == ["api", "models"] and parts[-2] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if parts[:2] == ["api", "models"] and parts[-2] == "commit":
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.server.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            self.server.revisions.append(parts[-1])
            repo, oid = "/".join(parts[2:-2]), "1" * 40
            url = f"http://127.0.0.1:{self.server.server_port}/{repo}/commit/{oid}"
            return self._reply(200, {"commitUrl": url, "commitOid": oid})
        return self._reply(404, {"error": f"stand-in does not serve {self.path}"})


@pytest.fixture
def hub_server(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    server.files, server.requests, server.created, server.branches, server.revisions = {}, [], [], [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite imported huggingface_hub offline
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory as the trainer leaves it: final/ (model + tokenizer), config.yaml, summary.json."""
    torch.manual_seed(0)
    cfg = NeoBERTConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    NeoBERTForMaskedLM(cfg).save_pretrained(tmp_path / "final")
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(tmp_path / "final")
    (tmp_path / "config.yaml").write_text("optimizer:\n  name: muonclip\n  lr: 0.0003\ntrainer:\n  max_steps: 7\n")
    (tmp_path / "summary.json").write_text(json.dumps({"final_eval_loss": 6.25, "steps": 7, "curve": [1, 2]}))
    return tmp_path


def test_model_card_contents(run_dir):
    card = build_model_card(resolve_source(run_dir), repo_id="me/tiny")
    n_params = sum(p.numel() for p in AutoModelForMaskedLM.from_pretrained(run_dir / "final").parameters())
    assert f"**Parameters:** {n_params:,}" in card
    assert "| num_hidden_layers | 1 |" in card and "| hidden_act | swiglu |" in card
    assert "name: muonclip" in card and "max_steps: 7" in card  # training config from config.yaml
    assert "| final_eval_loss | 6.25 |" in card and "curve" not in card  # scalar metrics only
    assert 'from_pretrained("me/tiny", trust_remote_code=True)' in card
    assert card.startswith("---\nlibrary_name: transformers\n")


def test_card_command_writes_readme_and_keeps_user_readme(run_dir, capsys):
    assert main(["card", str(run_dir / "final")]) == 0  # a model dir inside a run dir finds the run files
    readme = (run_dir / "final" / "README.md").read_text()
    assert CARD_MARKER in readme and "final_eval_loss" in readme
    (run_dir / "final" / "README.md").write_text("hand-written card\n")
    assert main(["card", str(run_dir)]) == 0
    assert (run_dir / "final" / "README.md").read_text() == "hand-written card\n"


def test_push_over_http_lands_files_that_reload(run_dir, hub_server, tmp_path, capsys):
    code = main(["push", str(run_dir), "--repo-id", "me/tiny-neobert", "--private", "--token", "hf_fake"])
    assert code == 0, capsys.readouterr().err
    assert "pushed me/tiny-neobert" in capsys.readouterr().out
    assert hub_server.created[0]["name"] == "tiny-neobert" and hub_server.created[0]["visibility"] == "private"
    assert all(auth == "Bearer hf_fake" for _, auth in hub_server.requests)
    files = hub_server.files
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_neobert.py",
        "configuration_neobert.py",
        "tokenizer.json",
        "README.md",
    ):
        assert name in files, sorted(files)
    assert "final_eval_loss" in files["README.md"].decode()

    landed = tmp_path / "landed"
    landed.mkdir()
    for name, data in files.items():
        (landed / name).write_bytes(data)
    original = AutoModelForMaskedLM.from_pretrained(run_dir / "final").eval()
    reloaded = AutoModelForMaskedLM.from_pretrained(landed).eval()
    assert reloaded.lm_head.weight is reloaded.model.embeddings.weight
    ids = torch.tensor([[2, 5, 6, 4, 8, 9, 3]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, original(input_ids=ids).logits)


def test_push_to_revision_creates_branch(run_dir, hub_server, capsys):
    assert main(["push", str(run_dir), "--repo-id", "me/x", "--revision", "v1", "--token", "hf_fake"]) == 0
    assert hub_server.branches == ["v1"] and hub_server.revisions == ["v1"]


def test_offline_push_fails_with_one_line(run_dir, capsys):
    code = main(["push", str(run_dir), "--repo-id", "me/x", "--token", "hf_fake"])  # suite runs HF_HUB_OFFLINE=1
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "error: cannot push: offline mode" in err


def test_missing_token_fails_with_one_line(run_dir, hub_server, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    code = main(["push", str(run_dir), "--repo-id", "me/x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no Hugging Face token" in err
    assert hub_server.requests == []


def test_unreachable_endpoint_fails_with_one_line(run_dir, hub_server, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    code = main(["push", str(run_dir), "--repo-id", "me/x", "--token", "hf_fake"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "push to http://127.0.0.1:9 failed" in err


# ---- evaluation results in the card, checkpoint revisions, the local release bundle -------------------------------

def _eval_results(model_dir: Path) -> None:
    from neobert_pt.evaluate.results import write_results

    write_results(model_dir, "tiny", None, {
        "probe": {"metrics": {"accuracy": 0.875, "random_init_accuracy": 0.5, "margin": 0.375, "test_examples": 600.0}},
        "glue": {"metrics": {"cola/matthews": 0.5, "cola/matthews_std": 0.1, "stsb/pearson": 0.8,
                             "stsb/pearson_std": 0.02, "average": 0.65},
                 "recipe": {"learning_rates": [2e-5], "seeds": [0, 1, 2]}},
    })


def _front_matter(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("---\n")[1])


def test_card_has_eval_table_and_model_index(run_dir):
    _eval_results(run_dir / "final")
    card = build_model_card(resolve_source(run_dir), repo_id="me/tiny")
    assert "## Evaluation" in card
    assert "| glue | cola/matthews | 0.5000 ± 0.1000 |" in card and "| probe | margin | 0.3750 |" in card
    assert "learning_rates" in card  # the GLUE recipe is printed
    index = _front_matter(card)["model-index"]
    assert index[0]["name"] == "me/tiny"
    results = {r["task"]["name"]: r for r in index[0]["results"]}
    cola = results["GLUE COLA"]
    assert cola["dataset"] == {"type": "nyu-mll/glue", "name": "GLUE COLA", "config": "cola", "split": "validation"}
    assert cola["metrics"] == [{"type": "matthews_correlation", "value": 0.5, "name": "cola/matthews"}]
    probe = results["Word-order probe (frozen encoder)"]["metrics"]
    assert {m["name"] for m in probe} == {"accuracy", "random_init_accuracy", "margin"}  # no counts, no std


def test_push_over_http_includes_eval_table_and_model_index(run_dir, hub_server, capsys):
    _eval_results(run_dir / "final")
    assert main(["push", str(run_dir), "--repo-id", "me/tiny", "--token", "hf_fake"]) == 0, capsys.readouterr().err
    readme = hub_server.files["README.md"].decode()
    assert "| glue | stsb/pearson | 0.8000 ± 0.0200 |" in readme
    assert _front_matter(readme)["model-index"][0]["results"]
    assert "eval_results.json" in hub_server.files and hub_server.revisions == ["main"]


@pytest.fixture
def checkpoint(run_dir):
    """RUN/checkpoints/step_5 as the trainer writes it (raw weights + config.yaml) and its eval results."""
    from safetensors.torch import save_file

    from neobert_pt.config import load_config, save_config
    from neobert_pt.evaluate.results import write_results

    run = load_config(None, ["--model.hidden_size", "32", "--model.num_hidden_layers", "1",
                             "--model.num_attention_heads", "2", "--model.intermediate_size", "64",
                             "--model.max_position_embeddings", "64", "--dataset.max_seq_length", "32"])
    torch.manual_seed(1)
    model = NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64, pad_token_id=0))
    ckpt = run_dir / "checkpoints" / "step_5"
    ckpt.mkdir(parents=True)
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, ckpt / "model.safetensors")
    save_config(run, ckpt / "config.yaml")
    write_results(run_dir / "eval" / "step_5", str(ckpt), 5, {"pppl": {"metrics": {"pppl": 123.5, "tokens": 60.0}}})
    return ckpt, model


def test_checkpoint_push_lands_on_its_revision(run_dir, checkpoint, hub_server, tmp_path, capsys):
    ckpt, model = checkpoint
    assert main(["push", str(ckpt), "--repo-id", "me/tiny", "--token", "hf_fake"]) == 0, capsys.readouterr().err
    assert hub_server.branches == ["step_5"] and hub_server.revisions == ["step_5"]
    readme = hub_server.files["README.md"].decode()
    assert "optimizer step 5" in readme and "| pppl | pppl | 123.5000 |" in readme
    assert "Final metrics" not in readme  # the run's final summary does not describe step 5
    landed = tmp_path / "landed_step5"
    landed.mkdir()
    for name, data in hub_server.files.items():
        (landed / name).write_bytes(data)
    reloaded = AutoModelForMaskedLM.from_pretrained(landed).eval()
    assert torch.equal(reloaded.model.embeddings.weight, model.model.embeddings.weight)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "model.safetensors"]  # checkpoint untouched

    hub_server.branches.clear(), hub_server.revisions.clear()
    assert main(["push", str(ckpt), "--repo-id", "me/tiny", "--revision", "v0.1-step5", "--token", "hf_fake"]) == 0
    assert hub_server.branches == ["v0.1-step5"] and hub_server.revisions == ["v0.1-step5"]


def test_release_bundle_is_written_locally(run_dir, capsys):
    _eval_results(run_dir / "final")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n')
    (run_dir / "loss_curve.png").write_bytes(b"\x89PNG fake")
    assert main(["release", str(run_dir)]) == 0, capsys.readouterr().err
    out = run_dir / "release"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modeling_neobert.py", "config.yaml",
                 "metrics.jsonl", "summary.json", "loss_curve.png", "eval_results.json", "eval_results.md",
                 "README.md"):
        assert (out / name).is_file(), name
    assert "model-index" in (out / "README.md").read_text() and "## Evaluation" in (out / "README.md").read_text()
    assert AutoModelForMaskedLM.from_pretrained(out) is not None
    assert main(["release", str(run_dir)]) == 0  # rewriting its own bundle is fine
    capsys.readouterr()
    (run_dir / "elsewhere").mkdir()
    (run_dir / "elsewhere" / "notes.txt").write_text("mine")
    assert main(["release", str(run_dir), "--output", str(run_dir / "elsewhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and (run_dir / "elsewhere" / "notes.txt").is_file()
