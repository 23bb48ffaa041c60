"""Write examples/data/gradient.png: a 96x64 RGB test image (smooth gradients plus a disc), made
with the standard library only. Run: python3 examples/data/make_test_image.py"""
import math
import os
import struct
import zlib

W, H = 96, 64
rows = []
for y in range(H):
    row = bytearray([0])  # filter type None
    for x in range(W):
        d = math.hypot(x - 78, y - 48)
        r = int(255 * x / (W - 1))
        g = int(255 * y / (H - 1))
        b = 230 if d < 10 else int(128 + 100 * math.sin(x / 7.0) * math.cos(y / 5.0))
        row += bytes((r, g, b))
    rows.append(bytes(row))


def chunk(kind, data):
    c = struct.pack(">I", len(data)) + kind + data
    return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


png = b"\x89PNG\r\n\x1a\n"
png += chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
png += chunk(b"IEND", b"")
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gradient.png")
with open(out, "wb") as f:
    f.write(png)
print(out, len(png), "bytes")
