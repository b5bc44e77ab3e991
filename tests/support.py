"""What the Python test scripts share: the repository root, the chat-capable tiny model, starting
the server."""
import json
import pathlib
import shutil
import subprocess
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]


def chat_model(dir):
    """Writes into `dir` the tiny model of models/ with the chat fixtures' byte-level tokenizer and
    ChatML template (as the Rust tests' `chat_model`)."""
    dir = pathlib.Path(dir)
    for f in ["model.onnx", "config.json"]:
        shutil.copy(ROOT / "models/tiny-mixtral" / f, dir / f)
    shutil.copy(ROOT / "tests/fixtures/chat/tokenizer.json", dir / "tokenizer.json")
    shutil.copy(ROOT / "tests/fixtures/chat/chatml.jinja", dir / "chat_template.jinja")
    (dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))



def start_server(argv):
    """Starts `moe-edge serve` (its whole argv, with `--addr 127.0.0.1:0`) and returns the process
    and the URL it says it listens on; the rest of its stderr is drained in the background."""
    server = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if line.startswith("listening on "):
            url = line.split("listening on ", 1)[1].strip()
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            return server, url
    server.kill()
    raise AssertionError("the server did not start")
