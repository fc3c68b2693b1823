"""A model holder: one long-lived process beside a SuperNode that keeps the base model loaded.

Flower 1.42's SuperNode runs every message in a fresh ``flwr-clientapp`` process, which
pulls one message, runs it and exits (``flwr.supernode.runtime.run_clientapp``). A
per-process cache dies with it, so without help the base model (and the clients' data)
would be loaded for every message. A holder is started once per node
(``elora-fed model-holder --file F``) and serves the handlers of ``clients.handlers`` in
its own process, where that cache lives. A node whose node config names the file
(``flower-supernode --node-config "... model-holder='F'"``) routes every message there:
its short-lived ClientApp sends the request content and its ``Context`` over loopback and
gets back the reply and the changes to the Context state (secure mode keeps a client's
statistics there). The ClientApp itself imports neither torch nor the model stack.

Calls are served one at a time: they share one model, whose adapter weights each handler
sets. The connection is ``multiprocessing.connection`` on 127.0.0.1, authenticated by an
HMAC challenge on a random key that only the holder's file (mode 0600) holds: the
messages are pickles, so only a process that can read the file may call the holder.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from types import FrameType

from flwr.app import Context, RecordDict

from elora_fed.errors import EloraFedError

NODE_CONFIG_KEY = "model-holder"
"""The node-config key that names a holder's file; a node without it runs handlers in its own process."""

Handler = Callable[[RecordDict, Context], RecordDict]


class ModelHolderError(EloraFedError):
    """The holder named in the node config cannot be reached, or a handler failed inside it."""


def run_handler(name: str, content: RecordDict, context: Context) -> RecordDict:
    """Handler ``name``'s reply: from the node's model holder if its node config names one, else computed here."""
    file = context.node_config.get(NODE_CONFIG_KEY)
    if file is None or str(file) == "":
        from clients.handlers import HANDLERS

        return HANDLERS[name](content, context)
    return call_holder(Path(str(file)), name, content, context)


def call_holder(file: Path, name: str, content: RecordDict, context: Context) -> RecordDict:
    """Run handler ``name`` in the holder that ``file`` describes; apply its Context state changes here."""
    address, key = _read_file(file)
    try:
        connection = Client(address, authkey=key)
    except AuthenticationError as e:
        raise ModelHolderError(
            f"the model holder at {address[0]}:{address[1]} refused the key in {file}: "
            "the file is from another holder (restart the SuperNode's holder, or point the node at its file)"
        ) from e
    except (OSError, EOFError) as e:
        raise ModelHolderError(
            f"the model holder at {address[0]}:{address[1]} (from {file}) does not answer ({type(e).__name__}: {e}): "
            f"start it with `elora-fed model-holder --file {file}`"
        ) from e
    with connection:
        connection.send((name, content, context))
        answer = connection.recv()
    if answer[0] == "error":
        _, kind, message, trace = answer
        raise ModelHolderError(f"handler '{name}' failed in the model holder: {kind}: {message}\n{trace}")
    _, reply, changed, removed = answer
    for key_name, record in changed.items():
        context.state[key_name] = record
    for key_name in removed:
        del context.state[key_name]
    return reply


def serve(file: Path, handlers: dict[str, Handler], idle_timeout: float = 0.0) -> int:
    """Listen on a free loopback port, write ``file``, and serve calls until stopped (or idle for ``idle_timeout`` s).

    SIGTERM stops it after the call in progress, if any; the file is removed on the way out.
    """
    key = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), authkey=key)
    host, port = listener.address
    file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        json.dump({"host": host, "port": port, "key": key.hex(), "pid": os.getpid()}, f)

    state = {"busy": False, "stop": False}

    def stop(signum: int, frame: FrameType | None) -> None:  # a call in progress is finished first
        state["stop"] = True
        if not state["busy"]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if idle_timeout > 0:
        signal.signal(signal.SIGALRM, stop)
    served = 0
    print(f"model holder: listening on {host}:{port} ({file})", flush=True)
    try:
        while True:
            if idle_timeout > 0:
                signal.alarm(max(1, round(idle_timeout)))
            try:
                connection = listener.accept()
            except (OSError, EOFError, AuthenticationError) as e:  # a caller without the key, or one that went away
                print(f"model holder: refused a connection ({type(e).__name__}: {e})", flush=True)
                continue
            signal.alarm(0)
            state["busy"] = True
            with connection:
                start = time.perf_counter()
                name, loads = _serve_one(connection, handlers)
                served += 1
                took = time.perf_counter() - start
                print(f"model holder: {name} in {took:.2f} s ({served} served, model loads {loads})", flush=True)
            state["busy"] = False
            if state["stop"]:
                break
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        file.unlink(missing_ok=True)
    print(f"model holder: stopped after {served} calls", flush=True)
    return 0


def _serve_one(connection: Connection, handlers: dict[str, Handler]) -> tuple[str, object]:
    """Answer one call; return its handler's name and the reply's ``model-loads`` (this process's loads so far)."""
    loads: object = None
    try:
        name, content, context = connection.recv()
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        return f"(unreadable call: {type(e).__name__})", loads
    try:
        if name not in handlers:
            raise ModelHolderError(f"no handler '{name}' (this holder serves {', '.join(sorted(handlers))})")
        before = {k: pickle.dumps(v) for k, v in context.state.items()}
        reply = handlers[name](content, context)
        changed = {k: v for k, v in context.state.items() if before.get(k) != pickle.dumps(v)}
        removed = [k for k in before if k not in context.state]
        connection.send(("ok", reply, changed, removed))
        loads = reply.metric_records["metrics"].get("model-loads") if "metrics" in reply.metric_records else None
    except Exception as e:  # the caller raises it, so Flower reports the message as failed
        connection.send(("error", type(e).__name__, str(e), traceback.format_exc()))
    return str(name), loads


def _read_file(file: Path) -> tuple[tuple[str, int], bytes]:
    try:
        info = json.loads(file.read_text())
        return (str(info["host"]), int(info["port"])), bytes.fromhex(info["key"])
    except FileNotFoundError as e:
        raise ModelHolderError(
            f"no model holder file {file} (node config '{NODE_CONFIG_KEY}'): "
            f"start one with `elora-fed model-holder --file {file}`"
        ) from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelHolderError(f"model holder file {file} is not readable: {type(e).__name__}: {e}") from e
