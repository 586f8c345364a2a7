#!/usr/bin/env python3
"""Independent OPC UA server for edgefleet interop tests (asyncua).

Usage: opcua_server.py --port PORT --count N --pki DIR [--interval-ms MS]

Serves N variables `ns=<idx>;s=v<i>` (namespace "urn:edgefleet:interop")
cycling through the types Boolean, SByte, Byte, Int16, UInt16, Int32,
UInt32, Int64, UInt64, Float, Double. Every tick k (default 100 ms) each
variable takes a value derived from k alone:

    Boolean: k % 2      integers: k % 100      Float/Double: (k % 100) + 0.5

so a client can check every value it receives without sharing state.
Endpoints: None, Basic256Sha256 Sign and SignAndEncrypt, with a self-signed
certificate created in DIR. Prints "READY <port> <namespace index>" once up.
"""
import argparse
import asyncio
import datetime
import socket
import sys
from pathlib import Path

from asyncua import Server, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

TYPES = [
    ua.VariantType.Boolean,
    ua.VariantType.SByte,
    ua.VariantType.Byte,
    ua.VariantType.Int16,
    ua.VariantType.UInt16,
    ua.VariantType.Int32,
    ua.VariantType.UInt32,
    ua.VariantType.Int64,
    ua.VariantType.UInt64,
    ua.VariantType.Float,
    ua.VariantType.Double,
]


def value_for(vt, k):
    if vt == ua.VariantType.Boolean:
        return k % 2 == 1
    if vt in (ua.VariantType.Float, ua.VariantType.Double):
        return (k % 100) + 0.5
    return k % 100


async def announce(port, ns):
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                print(f"READY {port} {ns}", flush=True)
                return
        except OSError:
            await asyncio.sleep(0.02)
    sys.exit("server did not start")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--pki", required=True)
    ap.add_argument("--interval-ms", type=int, default=100)
    args = ap.parse_args()

    pki = Path(args.pki)
    pki.mkdir(parents=True, exist_ok=True)
    cert, key = pki / "server-cert.der", pki / "server-key.pem"
    app_uri = "urn:edgefleet:interop:asyncua"
    await setup_self_signed_certificate(
        key, cert, app_uri, "127.0.0.1",
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        {"countryName": "XX", "organizationName": "edgefleet", "commonName": "interop"},
    )

    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{args.port}/")
    await server.set_application_uri(app_uri)
    server.set_security_policy([
        ua.SecurityPolicyType.NoSecurity,
        ua.SecurityPolicyType.Basic256Sha256_Sign,
        ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ])
    await server.load_certificate(str(cert))
    await server.load_private_key(str(key))
    ns = await server.register_namespace("urn:edgefleet:interop")
    objects = server.nodes.objects
    variables = []
    for i in range(args.count):
        vt = TYPES[i % len(TYPES)]
        node = await objects.add_variable(ua.NodeId(f"v{i}", ns), f"v{i}", ua.Variant(value_for(vt, 0), vt))
        variables.append((node, vt))

    async with server:
        asyncio.get_running_loop().create_task(announce(args.port, ns))
        k = 0
        while True:
            await asyncio.sleep(args.interval_ms / 1000)
            k += 1
            now = datetime.datetime.now(datetime.timezone.utc)
            for node, vt in variables:
                dv = ua.DataValue(ua.Variant(value_for(vt, k), vt), SourceTimestamp=now, ServerTimestamp=now)
                await server.write_attribute_value(node.nodeid, dv)


if __name__ == "__main__":
    asyncio.run(main())
