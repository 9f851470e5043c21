#!/usr/bin/env python3
"""Print the kernel config embedded in a bzImage (CONFIG_IKCONFIG), like the kernel's
scripts/extract-ikconfig, without needing a kernel source tree. Exit 1 if none."""
import gzip
import sys
import zlib

MARK_START, MARK_END = b"IKCFG_ST", b"IKCFG_ED"


def embedded_config(blob: bytes):
    # The ikconfig blob sits inside the compressed vmlinux; try every gzip stream.
    pos = blob.find(b"\x1f\x8b\x08")
    while pos != -1:
        try:
            vmlinux = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob[pos:])
        except zlib.error:
            vmlinux = b""
        start = vmlinux.find(MARK_START)
        if start != -1:
            end = vmlinux.find(MARK_END, start)
            return gzip.decompress(vmlinux[start + len(MARK_START):end])
        pos = blob.find(b"\x1f\x8b\x08", pos + 1)
    return None


def main():
    with open(sys.argv[1], "rb") as f:
        config = embedded_config(f.read())
    if config is None:
        print(f"{sys.argv[1]}: no embedded config (needs CONFIG_IKCONFIG and a gzip kernel)", file=sys.stderr)
        return 1
    sys.stdout.write(config.decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
