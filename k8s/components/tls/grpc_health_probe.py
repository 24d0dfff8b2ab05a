"""Exec probe for a gRPC port that speaks TLS, which the kubelet's native gRPC probe cannot: calls
grpc.health.v1.Health/Check on this pod's own port and exits 0 if it answers SERVING, 1 otherwise.

    python grpc_health_probe.py SERVER_NAME CA_FILE

SERVER_NAME: a DNS name of the server's certificate (the Service's name); CA_FILE: the CA that signed it. The
port is RLHF_GRPC_PORT. Under mutual TLS (RLHF_TLS_CLIENT_CA_FILE set) the probe presents the pod's own
certificate and key (RLHF_TLS_CERT_FILE, RLHF_TLS_KEY_FILE), which must then allow client authentication.
"""

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def credentials(ca_file: str) -> grpc.ChannelCredentials:
    """Trusts `ca_file`; under mutual TLS also presents this pod's certificate."""
    mutual = bool(os.environ.get("RLHF_TLS_CLIENT_CA_FILE"))
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(os.environ["RLHF_TLS_KEY_FILE"]).read_bytes() if mutual else None,
        certificate_chain=Path(os.environ["RLHF_TLS_CERT_FILE"]).read_bytes() if mutual else None,
    )


def main(server_name: str, ca_file: str) -> int:
    target = f"127.0.0.1:{os.environ.get('RLHF_GRPC_PORT', '50051')}"
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(target, credentials(ca_file), options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as e:
            print(f"{target}: {e.code().name} {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
