#!/usr/bin/env python3
"""oci-layout.py [--gzip] [--ref NAME] OUT CMD TAR... — an OCI image layout at OUT whose
layers are the given uncompressed tar files in order (hard-linked or copied in;
gzip-compressed with --gzip, as registries usually hold them), running CMD (a JSON
list); --ref names the image in index.json (what `ctr image import` tags it as)."""
import argparse
import gzip
import hashlib
import json
import os
import shutil

parser = argparse.ArgumentParser()
parser.add_argument("--gzip", action="store_true")
parser.add_argument("--ref")
parser.add_argument("out")
parser.add_argument("cmd")
parser.add_argument("tars", nargs="+")
args = parser.parse_args()
compress, out, cmd, tars = args.gzip, args.out, json.loads(args.cmd), args.tars
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)


def put(data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


layers, diff_ids = [], []
for tar in tars:
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    diff_ids.append("sha256:" + h.hexdigest())
    if compress:
        tmp = os.path.join(blobs, "tmp.gz")
        with open(tar, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        os.replace(tmp, os.path.join(blobs, h.hexdigest()))
        media = "application/vnd.oci.image.layer.v1.tar+gzip"
    else:
        target = os.path.join(blobs, h.hexdigest())
        if not os.path.exists(target):
            try:
                os.link(tar, target)
            except OSError:
                shutil.copyfileobj(open(tar, "rb"), open(target, "wb"))
        media = "application/vnd.oci.image.layer.v1.tar"
    digest = h.hexdigest()
    layers.append({"mediaType": media, "digest": "sha256:" + digest,
                   "size": os.path.getsize(os.path.join(blobs, digest))})
config = put(json.dumps({
    "architecture": "amd64", "os": "linux",
    "rootfs": {"type": "layers", "diff_ids": diff_ids},
    "config": {"Cmd": cmd, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
}).encode())
manifest = put(json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
    "layers": layers,
}).encode())
with open(os.path.join(out, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [dict(
        manifest, mediaType="application/vnd.oci.image.manifest.v1+json",
        platform={"architecture": "amd64", "os": "linux"},
        **({"annotations": {"org.opencontainers.image.ref.name": args.ref}} if args.ref else {}))]}, f)
