#!/usr/bin/env python3
"""Flower 1.42's SecAgg+ (`SecAggPlusWorkflow` + `secaggplus_mod`) in one process, timed the way
`fedlora bench secagg` times fedlora: the peer side of the comparison in issue 15.

An in-memory Grid hands each message to that node's client app (secaggplus_mod around a
ClientApp whose train returns a fixed random float32 vector, no training) and times it; clients
listed as dropped answer the setup and share-keys stages and then fail, as fedlora's bench drops
them after sharing keys. Per client: the time inside its own handlers (setup, share keys, mask,
unmask). Coordinator: the workflow's total wall time minus the clients' time, with the summing of
masked vectors (stage 2) and the unmasking (stage 3) timed apart.

    pip install flwr==1.42.0
    python3 tools/flower_secaggplus_bench.py --clients 100 --params 1000000 \
        --num-shares 3 --threshold 2 --dropout 0.1 --json

Flower's `num_shares` counts the client itself: num_shares 3 means 2 other neighbours (2
pairwise masks), 5 means 4. fedlora's `--neighbours k` counts others only.
"""

import argparse
import copy
import json
import statistics
import time

import flwr.common
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
)
import flwr.compat.common.recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as wf
from flwr.serverapp.grid import Grid
from flwr.supercore.task_identity import TaskIdentity


class Proxy(ClientProxy):
    """A registered node: the workflow only reads its node id."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class LocalGrid(Grid):
    """Delivers each message to its node's client app in this process and times it."""

    def __init__(self, nodes, params, dropped):
        self.nodes = nodes
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(),
                         run_config={})
            for nid in nodes
        }
        rng = np.random.default_rng(7)
        self.vectors = {nid: [rng.uniform(-1, 1, params).astype(np.float32)] for nid in nodes}
        self.dropped = dropped
        self.client_s = {nid: 0.0 for nid in nodes}
        self.stage_calls = 0
        self.transport_s = 0.0
        self._run = None

    def set_run(self, run_id):
        pass

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id,
                       message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def get_nodes(self):
        return []

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        self.stage_calls += 1
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            # the dropped clients leave after sharing keys (before their masked input)
            if nid in self.dropped and self.stage_calls >= 3:
                continue
            # a real link serializes each message; the mod mutates what it receives, so each
            # node gets its own copy (the copy is the transport's time, not the coordinator's)
            c0 = time.perf_counter()
            msg = copy.deepcopy(msg)
            self.transport_s += time.perf_counter() - c0
            vec = self.vectors[nid]

            def train(m, ctxt, vec=vec):
                res = FitRes(status=Status(code=Code.OK, message=""),
                             parameters=ndarrays_to_parameters(vec), num_examples=1,
                             metrics={})
                return Message(compat.fitres_to_recorddict(res, False), reply_to=m)

            t0 = time.perf_counter()
            reply = secaggplus_mod(msg, self.contexts[nid], train)
            self.client_s[nid] += time.perf_counter() - t0
            replies.append(reply)
        return replies


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--num-shares", type=int, default=3)
    ap.add_argument("--threshold", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    # what a SuperLink would set for the ServerApp's task
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
    nodes = list(range(1, a.clients + 1))
    ndrop = round(a.clients * a.dropout)
    dropped = set()  # chosen on Flower's own ring once it is built (below)
    grid = LocalGrid(nodes, a.params, dropped)
    manager = SimpleClientManager()
    for nid in nodes:
        p = Proxy(str(nid))
        p.node_id = nid
        manager.register(p)
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=a.clients,
                      min_available_clients=a.clients)
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(a.params, dtype=np.float32)]), True)
    ctx = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=state,
                                run_config={}), strategy=strategy, client_manager=manager)
    workflow = wf.SecAggPlusWorkflow(num_shares=a.num_shares,
                                     reconstruction_threshold=a.threshold)

    # time the coordinator's summing (stage 2) and unmasking (stage 3) apart
    stage_wall = {}
    for name in ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage",
                 "unmask_stage"):
        orig = getattr(wf.SecAggPlusWorkflow, name)

        def timed(self, g, c, s, orig=orig, name=name):
            if name == "collect_masked_vectors_stage":
                # drop clients after sharing keys, placed greedily (as fedlora's bench does) so
                # that every secret keeps t live holders on Flower's shuffled ring
                live = {n: len(s.nid_to_neighbours[n]) for n in nodes}
                for cand in nodes:
                    if len(dropped) == ndrop:
                        break
                    around = s.nid_to_neighbours[cand] - {cand}
                    if live[cand] - 1 >= a.threshold and all(
                            live[v] - 1 >= a.threshold for v in around):
                        dropped.add(cand)
                        for v in s.nid_to_neighbours[cand]:
                            live[v] -= 1
                assert len(dropped) == ndrop, "cannot place the dropouts"
            before = sum(grid.client_s.values()) + grid.transport_s
            t0 = time.perf_counter()
            ok = orig(self, g, c, s)
            other = sum(grid.client_s.values()) + grid.transport_s - before
            stage_wall[name] = time.perf_counter() - t0 - other
            return ok
        setattr(workflow, name, timed.__get__(workflow))

    t0 = time.perf_counter()
    workflow(grid, ctx)
    total = time.perf_counter() - t0
    client_total = sum(grid.client_s.values()) + grid.transport_s
    survivors = [n for n in nodes if n not in dropped]
    per_client = statistics.median(grid.client_s[n] for n in survivors) * 1e3
    # the aggregate must be the mean of the survivors' vectors (up to Flower's quantization)
    got = compat.arrayrecord_to_parameters(state.array_records[MAIN_PARAMS_RECORD], True)
    got = flwr.common.parameters_to_ndarrays(got)[0]
    want = np.mean([grid.vectors[n][0] for n in survivors], axis=0)
    max_err = float(np.max(np.abs(got - want)))
    out = {
        "peer": "flwr 1.42.0 SecAggPlusWorkflow + secaggplus_mod, one process",
        "clients": a.clients,
        "params": a.params,
        "num_shares": a.num_shares,
        "threshold": a.threshold,
        "dropped": len(dropped),
        "client_median_ms": per_client,
        "coordinator_ms": (total - client_total) * 1e3,
        "coordinator_stage_ms": {k: v * 1e3 for k, v in stage_wall.items()},
        "total_s": total,
        "transport_copy_s": grid.transport_s,
        "max_abs_error_vs_mean": max_err,
    }
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
