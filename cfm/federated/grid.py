"""An in-process Flower Grid: the server's messages go to ClientApps in this process.

Every message is serialised to its protobuf bytes and parsed back on the way in and on the
way out, exactly what would cross the network, and logged (`log`: direction, node, bytes,
the parsed message) so tests can inspect what a site sends. Used by the tests and the
benchmark (many rounds and folds, no process start-up per message); the same ServerApp and
ClientApp code runs on real SuperLink / SuperNode processes (cfm.federated.deploy).
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1


def _wire(msg: Message) -> tuple[Message, bytes]:
    raw = message_to_proto(msg).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(raw)
    return message_from_proto(proto), raw


class LocalGrid(Grid):
    """Sites {node_id: (ClientApp, node_config)}; `drop` {node_id: k}: that site's next k
    train messages get no reply (a client killed mid-round, then started again); `log`: every
    message as (direction, node, raw bytes, message)."""

    def __init__(self, sites: dict[int, tuple[ClientApp, dict]]):
        self.sites = sites
        self.drop: dict[int, int] = {}
        self.log: list[tuple[str, int, bytes, Message]] = []
        self._run = Run.create_empty(run_id=1)
        # what a ServerApp process's runtime sets: messages are stamped with these ids
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
        self._contexts = {n: Context(run_id=1, node_id=n, node_config=dict(cfg),
                                     state=RecordDict(), run_config={})
                          for n, (_, cfg) in sites.items()}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers in send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers in send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE
            msg.metadata.__dict__["_run_id"] = 1
            delivered, raw = _wire(msg)
            self.log.append(("to_site", node, raw, delivered))
            if self.drop.get(node, 0) > 0:
                self.drop[node] -= 1
                continue
            app, _ = self.sites[node]
            try:
                reply = app(delivered, self._contexts[node])
            except Exception as ex:  # noqa: BLE001 - as a SuperNode: an error reply
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      f"{type(ex)}:<'{ex}'>"), reply_to=delivered)
            reply.metadata.__dict__["_src_node_id"] = node
            back, raw = _wire(reply)
            self.log.append(("from_site", node, raw, back))
            replies.append(back)
        return replies
