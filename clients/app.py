"""The ClientApp: one Flower client per task (a Shakespeare role or a classification task).

Flower glue only: each message kind is routed to its handler in ``clients.handlers``,
computed in this process (simulation: a Ray actor, whose cache keeps the model loaded) or
in the node's model holder (deployment: ``clients.model_holder``). This module imports
neither torch nor the model stack, so a deployed SuperNode's per-message ClientApp
process starts in about a second.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from clients.faults import simulated_dropout
from clients.model_holder import run_handler

app = ClientApp(mods=[simulated_dropout])


def secure_statistics_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A mod for the ``train`` handler: SecAgg+ messages go through ``secaggplus_mod`` to ``secagg`` (``clients.secure``)."""
    if RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)
    return secaggplus_mod(message, context, lambda m, c: Message(run_handler("secagg", m.content, c), reply_to=m))


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """Reply with this client's id and its number of samples per split (and theta* if asked)."""
    return Message(run_handler("stats", msg.content, context), reply_to=msg)


@app.query("sketch")
def sketch(msg: Message, context: Context) -> Message:
    """Reply with this client's sketch (``clients.handlers.sketch_content``)."""
    return Message(run_handler("sketch", msg.content, context), reply_to=msg)


@app.query("surrogate_losses")
def surrogate_losses(msg: Message, context: Context) -> Message:
    """Secure mode: this client's surrogate validation losses at the server's w_S (``clients.secure``)."""
    return Message(run_handler("surrogate_losses", msg.content, context), reply_to=msg)


@app.train(mods=[secure_statistics_mod])  # SecAgg+ rounds (secure mode) go to the mod
def train(msg: Message, context: Context) -> Message:
    """Local training from the received adapter; reply with the update and its sample count."""
    return Message(run_handler("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received ensemble on one of this client's splits."""
    return Message(run_handler("evaluate", msg.content, context), reply_to=msg)


@app.query("boost")
def boost(msg: Message, context: Context) -> Message:
    """Residual targets and projected gradients of this client's train samples, for boosting."""
    return Message(run_handler("boost", msg.content, context), reply_to=msg)
