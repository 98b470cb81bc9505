#!/usr/bin/env python3
"""Writes a one-layer OCI image archive from a root filesystem directory,
without a registry or a daemon; `ctr images import` reads it.

  oci.py ROOTFS ARCHIVE NAME:TAG ENTRYPOINT_JSON [USER]
"""
import gzip, hashlib, io, json, os, shutil, sys, tarfile

rootfs, archive, ref, entrypoint = sys.argv[1:5]
user = sys.argv[5] if len(sys.argv) > 5 else "0:0"
name, tag = ref.rsplit(":", 1)


def layer_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for dirpath, dirnames, filenames in sorted(os.walk(rootfs)):
            dirnames.sort()
            # Directories that are symlinks (os.walk lists them as dirs).
            entries = sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
            for entry in ([""] if dirpath != rootfs else []) + entries:
                path = os.path.join(dirpath, entry) if entry else dirpath
                info = t.gettarinfo(path, arcname=os.path.relpath(path, rootfs))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if info.isfile():
                    with open(path, "rb") as f:
                        t.addfile(info, f)
                else:
                    t.addfile(info)
    return buf.getvalue()


def blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


raw = layer_tar()
gz = gzip.compress(raw, mtime=0)
layout = archive + ".d"
os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
layer = dict(blob(layout, gz), mediaType="application/vnd.oci.image.layer.v1.tar+gzip")
config = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Entrypoint": json.loads(entrypoint),
        "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "User": user,
        "Labels": {"org.opencontainers.image.title": name, "org.opencontainers.image.version": tag},
    },
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
}
cfg = dict(blob(layout, json.dumps(config, sort_keys=True).encode()), mediaType="application/vnd.oci.image.config.v1+json")
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cfg, "layers": [layer]}
man = dict(blob(layout, json.dumps(manifest, sort_keys=True).encode()), mediaType="application/vnd.oci.image.manifest.v1+json")
man["annotations"] = {"org.opencontainers.image.ref.name": tag, "io.containerd.image.name": ref}
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [man]}, f)
with open(os.path.join(layout, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
with tarfile.open(archive, "w") as t:
    for entry in ["oci-layout", "index.json", "blobs"]:
        t.add(os.path.join(layout, entry), arcname=entry)
shutil.rmtree(layout)
