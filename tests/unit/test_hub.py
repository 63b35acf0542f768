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
