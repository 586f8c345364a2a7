#!/usr/bin/env python3
"""Independent Modbus TCP server for edgefleet interop tests (pymodbus).

Usage: modbus_server.py --port PORT --spec SPEC.json

SPEC: {"unit": 1, "points": [{"table": "holding"|"input"|"coil"|"discrete-input",
       "address": 0, "type": "bool|i16|u16|i32|u32|i64|f32|f64",
       "byte_order": "big-endian|little-endian", "word_order": "high-first|low-first",
       "value": 1.5}, ...]}

Registers are encoded here with Python's `struct` (an implementation
independent of edgefleet's encoder); for big-endian byte order the result is
cross-checked against pymodbus' own `convert_to_registers`. Addresses that no
point covers are left undefined, so pymodbus answers reads spanning them
with exception 2 (illegal data address), which exercises the driver's
fallback from merged to single-point reads.

Prints "READY <port>" on stdout once it accepts connections.
"""
import argparse
import asyncio
import json
import socket
import struct
import sys

from pymodbus.client import ModbusTcpClient
from pymodbus.server import StartAsyncTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

FMT = {"i16": ">h", "u16": ">H", "i32": ">i", "u32": ">I", "i64": ">q", "f32": ">f", "f64": ">d"}
PYMODBUS_TYPE = {
    "i16": ModbusTcpClient.DATATYPE.INT16,
    "u16": ModbusTcpClient.DATATYPE.UINT16,
    "i32": ModbusTcpClient.DATATYPE.INT32,
    "u32": ModbusTcpClient.DATATYPE.UINT32,
    "i64": ModbusTcpClient.DATATYPE.INT64,
    "f32": ModbusTcpClient.DATATYPE.FLOAT32,
    "f64": ModbusTcpClient.DATATYPE.FLOAT64,
}


def encode(value, typ, byte_order, word_order):
    """Registers of one value, most significant byte of the value first."""
    if typ == "bool":
        return [1 if value else 0]
    if typ in ("f32", "f64"):
        raw = struct.pack(FMT[typ], float(value))
    else:
        raw = struct.pack(FMT[typ], int(value))
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if word_order == "low-first":
        words.reverse()
    if byte_order == "little-endian":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    if byte_order == "big-endian":
        wo = "big" if word_order == "high-first" else "little"
        num = float(value) if typ in ("f32", "f64") else int(value)
        theirs = ModbusTcpClient.convert_to_registers(num, PYMODBUS_TYPE[typ], word_order=wo)
        if list(theirs) != words:
            sys.exit(f"encoder disagreement for {typ} {value} {wo}: {words} vs pymodbus {theirs}")
    return words


def build(spec):
    tables = {"coil": {}, "discrete-input": {}, "holding": {}, "input": {}}
    for p in spec["points"]:
        t = p["table"]
        if t in ("coil", "discrete-input"):
            tables[t][p["address"]] = [bool(p["value"])]
        else:
            regs = encode(p["value"], p["type"], p.get("byte_order", "big-endian"), p.get("word_order", "high-first"))
            tables[t][p["address"]] = regs

    def simdata(entries, bits):
        out = []
        for addr in sorted(entries):
            vals = entries[addr]
            out.append(SimData(addr, values=vals, datatype=DataType.BITS if bits else DataType.REGISTERS))
        return out or [SimData(60000, values=[False] if bits else [0], datatype=DataType.BITS if bits else DataType.REGISTERS)]

    return SimDevice(
        spec.get("unit", 1),
        simdata=(
            simdata(tables["coil"], True),
            simdata(tables["discrete-input"], True),
            simdata(tables["holding"], False),
            simdata(tables["input"], False),
        ),
        use_bit_addressing=True,
    )


async def announce(port):
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                print(f"READY {port}", flush=True)
                return
        except OSError:
            await asyncio.sleep(0.02)
    sys.exit("server did not start")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--spec", required=True)
    args = ap.parse_args()
    with open(args.spec, encoding="utf-8") as f:
        spec = json.load(f)
    device = build(spec)
    asyncio.get_running_loop().create_task(announce(args.port))
    await StartAsyncTcpServer(context=[device], address=("127.0.0.1", args.port))


if __name__ == "__main__":
    asyncio.run(main())
