#!/usr/bin/env python3
"""oci-layout.py OUT CMD TAR... — an OCI image layout at OUT whose layers are the given
uncompressed tar files in order (hard-linked or copied in), running CMD (a JSON list)."""
import hashlib
import json
import os
import shutil
import sys

out, cmd, tars = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
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
    digest = h.hexdigest()
    target = os.path.join(blobs, digest)
    if not os.path.exists(target):
        try:
            os.link(tar, target)
        except OSError:
            shutil.copyfile(tar, target)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                   "digest": "sha256:" + digest, "size": os.path.getsize(tar)})
    diff_ids.append("sha256:" + digest)
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
        platform={"architecture": "amd64", "os": "linux"})]}, f)
