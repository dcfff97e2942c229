"""A tiny PNG line chart (zlib + struct, a 3×5 pixel font): the soak plot without a plotting library.

    canvas = Canvas(900, 560)
    canvas.chart((60, 30, 880, 260), {"planner": [(0.0, 61.2), (0.5, 61.9)]}, title="RSS (MB)", x_label="minutes")
    canvas.save(Path("bench/soak.png"))
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

Color = tuple[int, int, int]
Series = Mapping[str, Sequence[tuple[float, float]]]

PALETTE: tuple[Color, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                              (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
BLACK, GREY, WHITE = (0, 0, 0), (200, 200, 200), (255, 255, 255)

# 3×5 glyphs, one string of 15 bits (rows top to bottom) per character.
_FONT = {c: g for c, g in zip(
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ .-/():%_+,=>",
    ["111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
     "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111",
     "010101111101101", "110101110101110", "111100100100111", "110101101101110", "111100110100111",
     "111100110100100", "111100101101111", "101101111101101", "111010010010111", "001001001101111",
     "101101110101101", "100100100100111", "101111111101101", "110101101101101", "111101101101111",
     "111101111100100", "111101101111011", "110101110101101", "111100111001111", "111010010010010",
     "101101101101111", "101101101101010", "101101111111101", "101101010101101", "101101111010010",
     "111001010100111", "000000000000000", "000000000000010", "000000111000000", "001001010100100",
     "010100100100010", "010001001001010", "000010000010000", "101001010100101", "000000000000111",
     "000010111010000", "000000000010100", "000111000111000", "100010001010100"], strict=True)}


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def dot(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, thick: int = 1) -> None:
        """Bresenham, ``thick`` pixels wide."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(thick):
                for oy in range(thick):
                    self.dot(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color: Color = BLACK, scale: int = 2) -> int:
        """Draw ``s`` with its top-left at (x, y); returns the x after it. Unknown characters draw blank."""
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for bit, on in enumerate(glyph):
                if on == "1":
                    for ox in range(scale):
                        for oy in range(scale):
                            self.dot(x + (bit % 3) * scale + ox, y + (bit // 3) * scale + oy, color)
            x += 4 * scale
        return x

    def chart(self, box: tuple[int, int, int, int], series: Series, *, title: str, x_label: str,
              y_min: float | None = 0.0) -> None:
        """Lines of ``series`` inside ``box`` = (left, top, right, bottom), with axes, ticks and a legend."""
        left, top, right, bottom = box
        points = [p for s in series.values() for p in s]
        if not points:
            return
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0 = min(ys) if y_min is None else min(y_min, min(ys))
        y1 = max(ys) * 1.1 if max(ys) > y0 else y0 + 1

        def px(x: float, y: float) -> tuple[int, int]:
            return (left + round((x - x0) / (x1 - x0) * (right - left)),
                    bottom - round((y - y0) / (y1 - y0) * (bottom - top)))

        for i in range(5):  # grid and tick labels
            yv = y0 + (y1 - y0) * i / 4
            _, yp = px(x0, yv)
            self.line(left, yp, right, yp, GREY)
            self.text(left - 8 - 8 * len(_fmt(yv)), yp - 5, _fmt(yv))
            xv = x0 + (x1 - x0) * i / 4
            xp, _ = px(xv, y0)
            self.line(xp, bottom, xp, bottom + 4, BLACK)
            self.text(xp - 4 * len(_fmt(xv)), bottom + 8, _fmt(xv))
        self.line(left, top, left, bottom, BLACK)
        self.line(left, bottom, right, bottom, BLACK)
        self.text(left, top - 16, title)
        self.text(right - 8 * len(x_label), bottom + 24, x_label)
        lx = left + 8 * len(title) + 24
        for (name, pts), color in zip(series.items(), PALETTE * 4, strict=False):
            for a, b in itertools.pairwise(pts):
                self.line(*px(*a), *px(*b), color, thick=2)
            self.line(lx, top - 11, lx + 14, top - 11, color, thick=3)
            lx = self.text(lx + 18, top - 16, name) + 14

    def save(self, path: Path) -> None:
        """Write an 8-bit RGB PNG."""
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * self.width * y:3 * self.width * (y + 1)])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                         + chunk(b"IEND", b""))


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}"
