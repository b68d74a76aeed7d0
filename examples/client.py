"""Train DreamBooth over HTTP from another service: start a training on the Cog server, receive
its webhooks, fetch the weights. Needs only `requests` (pip install requests).

    # the server: `docker run --gpus all -p 5000:5000 dreambooth` (--upload-url: docs/http.md)
    python examples/client.py --server http://localhost:5000 --photos dog.zip \
        --instance-prompt "a photo of sks dog" --class-prompt "a photo of a dog" \
        --webhook-host 0.0.0.0 --webhook-port 8000 --public-url http://host.docker.internal:8000 \
        --out dog.tar -i max_train_steps=800 -i save_sample_prompt="a photo of sks dog"

A training takes minutes to hours, longer than an HTTP request should stay open, so the request
is sent with `Prefer: respond-async` and a webhook: the server answers 202 at once and POSTs the
prediction to the webhook when it starts, as its logs grow, and when it completes (succeeded,
failed or canceled). The final webhook carries the output: a data: URI holding the tarball, or,
when the server runs with --upload-url, the URL the tarball was PUT to, downloaded here. Cog's
server has no GET for a prediction, so the webhook is the way to hear back. --photos takes a
local ZIP (sent inline as a data: URI) or an http(s) URL the server downloads (better for big
archives). Ctrl-C cancels the training on the server.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import json
import queue
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

DONE = ("succeeded", "failed", "canceled")


def receive_webhooks(host: str, port: int) -> tuple[ThreadingHTTPServer, queue.Queue]:
    """A small HTTP server that puts every webhook's JSON body on a queue."""
    events: queue.Queue = queue.Queue()

    class Webhook(BaseHTTPRequestHandler):
        def do_POST(self):
            events.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):  # the prediction's logs are what matter here
            pass

    server = ThreadingHTTPServer((host, port), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, events


def file_input(value: str) -> str:
    """A URL as it is; a local file as a data: URI."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    return "data:application/zip;base64," + base64.b64encode(Path(value).read_bytes()).decode()


def parse_value(text: str):
    """-i values as JSON where they parse (numbers, true/false), else as text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def save_output(output: str, dest: Path) -> None:
    """Write the tarball: decode an inlined data: URI, or stream an uploaded file's URL."""
    if output.startswith("data:"):
        dest.write_bytes(base64.b64decode(output.split(",", 1)[1]))
        return
    with requests.get(output, stream=True, timeout=60) as response:
        response.raise_for_status()
        with open(dest, "wb") as f:
            for chunk in response.iter_content(chunk_size=1 << 20):
                f.write(chunk)


def unknown_inputs(server: str, inputs: dict) -> str | None:
    """What is wrong with the input names, or None: Cog's server drops a name it does not know
    (the setting keeps its default), so check them against its schema before sending."""
    response = requests.get(f"{server}/openapi.json", timeout=60)
    if response.status_code != 200:
        return None  # a server without a schema validates nothing; nothing to compare with
    known = response.json()["components"]["schemas"]["Input"]["properties"]
    for name in inputs:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            return (f"{name} is not an input of this server" +
                    (f"; did you mean {close[0]}?" if close else " (see /openapi.json)"))
    return None


def train(args) -> int:
    hooks, events = receive_webhooks(args.webhook_host, args.webhook_port)
    public = args.public_url or f"http://{args.webhook_host}:{hooks.server_address[1]}"
    inputs = {"instance_data": file_input(args.photos), "instance_prompt": args.instance_prompt}
    if args.class_prompt:
        inputs["class_prompt"] = args.class_prompt
    for item in args.input:
        name, _, value = item.partition("=")
        inputs[name] = file_input(value[1:]) if value.startswith("@") else parse_value(value)
    unknown = unknown_inputs(args.server, inputs)
    if unknown:
        print(f"error: {unknown}", file=sys.stderr)
        return 2
    prediction_id = uuid.uuid4().hex  # chosen here, so Ctrl-C can cancel it by name
    response = requests.put(
        f"{args.server}/predictions/{prediction_id}", timeout=60,
        headers={"Prefer": "respond-async"},
        json={"input": inputs, "webhook": f"{public}/webhook",
              "webhook_events_filter": ["start", "logs", "completed"]})
    if response.status_code == 422:  # a wrong input: the server names the field and the rule
        for error in response.json()["detail"]:
            print(f"error: {error['loc'][-1]}: {error['msg']}", file=sys.stderr)
        return 2
    if response.status_code == 409:  # one training at a time per server
        print("error: the server is busy with another training; try again later",
              file=sys.stderr)
        return 1
    response.raise_for_status()
    print(f"started {prediction_id}; waiting for webhooks on {public}/webhook", file=sys.stderr)
    printed = 0
    try:
        while True:
            event = events.get(timeout=args.timeout)
            logs = event.get("logs") or ""
            print(logs[printed:], end="", file=sys.stderr)  # each webhook has all logs so far
            printed = len(logs)
            if event["status"] in DONE:
                break
    except queue.Empty:
        print(f"error: no webhook for {args.timeout} s", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        requests.post(f"{args.server}/predictions/{prediction_id}/cancel", timeout=60)
        print("canceled", file=sys.stderr)
        return 130
    finally:
        hooks.shutdown()
    if event["status"] != "succeeded":
        print(f"error: {event['status']}: {event.get('error')}", file=sys.stderr)
        return 1
    save_output(event["output"], Path(args.out))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="http://localhost:5000", help="the Cog server")
    parser.add_argument("--photos", required=True, help="ZIP of 3-20 photos: a path or a URL")
    parser.add_argument("--instance-prompt", required=True)
    parser.add_argument("--class-prompt")
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE",
                        help="any other input, as for cog predict (@path for a file)")
    parser.add_argument("--webhook-host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--webhook-port", type=int, default=0, help="0: any free port")
    parser.add_argument("--public-url", help="how the server reaches this machine (default: "
                        "http://WEBHOOK-HOST:PORT)")
    parser.add_argument("--out", default="dreambooth-weights.tar", help="where to save the tarball")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="give up after this many seconds without a webhook")
    return train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
