#!/usr/bin/env python3
"""Rewrite an overlayfs upper directory in place into OCI layer form: whiteouts (0/0
character devices) become empty `.wh.NAME` files, opaque directories
(trusted.overlay.opaque=y) get a `.wh..wh..opq` file, and overlayfs' own bookkeeping
xattrs (trusted.overlay.*: origin, impure, …) are dropped, as containerd's differ does."""
import os
import stat
import sys

root = sys.argv[1]
for dirpath, dirnames, filenames in os.walk(root):
    try:
        if os.getxattr(dirpath, "trusted.overlay.opaque") == b"y":
            os.removexattr(dirpath, "trusted.overlay.opaque")
            open(os.path.join(dirpath, ".wh..wh..opq"), "w").close()
    except OSError:
        pass
    for name in [dirpath] + [os.path.join(dirpath, n) for n in filenames + dirnames]:
        try:
            for attr in os.listxattr(name, follow_symlinks=False):
                if attr.startswith("trusted.overlay."):
                    os.removexattr(name, attr, follow_symlinks=False)
        except OSError:
            pass
    for name in filenames + dirnames:
        path = os.path.join(dirpath, name)
        st = os.lstat(path)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            os.unlink(path)
            open(os.path.join(dirpath, ".wh." + name), "w").close()
