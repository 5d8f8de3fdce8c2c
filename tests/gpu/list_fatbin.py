#!/usr/bin/env python3
"""Lists the device images embedded in ELF objects or static archives, like
`cuobjdump --list-elf --list-ptx` (which this machine's CUDA install lacks), and checks that
required targets are present.

    list_fatbin.py [--require sm_90] [--require compute_90] FILE...

Each .nv_fatbin section holds fat binaries: a 16-byte header (magic 0xBA55ED50, version,
header size, payload size) followed by entries whose header starts with
kind (1 = PTX, 2 = ELF/SASS), a version, the entry header size, the payload size, and, at
byte 28, the target's compute capability (e.g. 90)."""
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50


def elf_sections(data):
    """Yields (name, bytes) for each section of a 64-bit little-endian ELF object."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = data[strtab[4]:strtab[4] + strtab[5]]
    for h in headers:
        name = names[h[0]:names.index(b"\0", h[0])].decode()
        if h[1] != 8:  # SHT_NOBITS has no bytes in the file
            yield name, data[h[4]:h[4] + h[5]]


def archive_members(data):
    """Yields (name, bytes) for each member of a System V / GNU ar archive."""
    off, long_names = 8, b""
    while off + 60 <= len(data):
        name = data[off:off + 16].decode().strip()
        size = int(data[off + 48:off + 58].decode().strip())
        body = data[off + 60:off + 60 + size]
        if name == "//":  # GNU table of names longer than 15 characters
            long_names = body
        elif name.startswith("/") and name[1:].isdigit():
            start = int(name[1:])
            name = long_names[start:long_names.index(b"\n", start)].decode()
        yield name.rstrip("/"), body
        off += 60 + size + (size & 1)


def images(blob):
    """Yields (kind, arch) for every image in a .nv_fatbin section."""
    off = 0
    while off + 16 <= len(blob):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, off)
        if magic != FATBIN_MAGIC:
            break
        entry, end = off + header_size, off + header_size + fat_size
        while entry < end:
            kind, _v, entry_header, size = struct.unpack_from("<HHIQ", blob, entry)
            arch, = struct.unpack_from("<I", blob, entry + 28)
            yield ("ptx" if kind == 1 else "elf" if kind == 2 else "kind%d" % kind), arch
            entry += entry_header + size
        off = (end + 7) & ~7  # fat binaries are 8-byte aligned within the section


def objects(path):
    data = open(path, "rb").read()
    if data[:8] == b"!<arch>\n":
        for name, member in archive_members(data):
            if member[:4] == b"\x7fELF":
                yield "%s(%s)" % (path, name), member
    else:
        yield path, data


def main(argv):
    required, files = set(), []
    i = 0
    while i < len(argv):
        if argv[i] == "--require":
            required.add(argv[i + 1])
            i += 2
        else:
            files.append(argv[i])
            i += 1
    if not files:
        print(__doc__)
        return 2
    failed, any_device_code = False, False
    for path in files:
        for name, data in objects(path):
            found = set()
            for section, blob in elf_sections(data):
                if section == ".nv_fatbin":
                    for kind, arch in images(blob):
                        target = ("sm_%d" if kind == "elf" else "compute_%d") % arch
                        found.add(target)
                        print("%s: %s file: %s" % (name, kind.upper(), target))
            if not found:
                continue  # a host-only object (e.g. device.cpp.o)
            any_device_code = True
            missing = required - found
            if missing:
                print("%s: MISSING %s" % (name, " ".join(sorted(missing))))
                failed = True
    if required and not any_device_code:
        print("no device code found in %s" % " ".join(files))
        return 1
    if failed:
        return 1
    if required:
        print("ok: every object with device code has %s" % " ".join(sorted(required)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
