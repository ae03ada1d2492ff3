#!/usr/bin/env python3
"""A pivgate console in Python, to show the API is language-neutral.

It connects to the gateway as an application (mutual TLS with an
application certificate from the site's service CA), watches terminals and
prints every lock and unlock, resuming from the last sequence number it
handled (kept in a state file) after a restart.

The gRPC code is generated from the same .proto files as the Rust code:

    python3 -m grpc_tools.protoc -I proto --python_out=GEN --grpc_python_out=GEN \
        proto/pivgate/v1/common.proto proto/pivgate/v1/access.proto

Run:

    python3 examples/python/console.py --gen GEN --gateway 127.0.0.1:7443 \
        --ca service-ca.pem --cert console.pem --key console-key.pem \
        --state console.seq --terminal dispatch-03
"""

import argparse
import os
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gen", required=True, help="folder with the generated pivgate.v1 modules")
    p.add_argument("--gateway", default="127.0.0.1:7443")
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--state", required=True, help="file keeping the last sequence handled")
    p.add_argument("--terminal", action="append", default=[])
    p.add_argument("--exit-after", type=int, default=0, help="stop after this many events (tests)")
    a = p.parse_args()

    sys.path.insert(0, a.gen)
    import grpc
    from pivgate.v1 import access_pb2, access_pb2_grpc, common_pb2

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(read(a.ca), read(a.key), read(a.cert))
    options = [("grpc.ssl_target_name_override", a.server_name)]
    handled = 0
    backoff = 0.2
    while True:
        after = 0
        if os.path.exists(a.state):
            after = int(open(a.state).read().strip() or 0)
        try:
            with grpc.secure_channel(a.gateway, creds, options=options) as channel:
                stub = access_pb2_grpc.AccessServiceStub(channel)
                request = access_pb2.WatchEventsRequest(after_sequence=after, terminal_ids=a.terminal)
                print(f"py-console: watching {', '.join(a.terminal) or 'all terminals'} from sequence {after}", flush=True)
                for response in stub.WatchEvents(request):
                    e = response.event
                    if e.WhichOneof("kind") == "unlocked":
                        u = e.unlocked
                        print(f"py-console: #{e.sequence} {e.terminal_id} UNLOCKED by {u.operator_id} ({u.operator_name})", flush=True)
                    else:
                        reason = common_pb2.LockReason.Name(e.locked.reason).removeprefix("LOCK_REASON_")
                        print(f"py-console: #{e.sequence} {e.terminal_id} LOCKED ({reason})", flush=True)
                    tmp = a.state + ".tmp"
                    with open(tmp, "w") as f:
                        f.write(str(e.sequence))
                    os.replace(tmp, a.state)
                    handled += 1
                    if a.exit_after and handled >= a.exit_after:
                        return 0
        except grpc.RpcError as err:
            print(f"py-console: {err.code().name}: {err.details()}; reconnecting", file=sys.stderr, flush=True)
        time.sleep(backoff)
        backoff = min(backoff * 2, 10)


if __name__ == "__main__":
    sys.exit(main())
