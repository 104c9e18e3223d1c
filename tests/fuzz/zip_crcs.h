#pragma once
// For each central directory entry of a stored zip record whose local header and data lie
// inside the buffer, the CRC-32 of the data, written to both headers: an archive edited in
// place (a mutated input, a crafted test file) then gets past the CRC check to what follows.
// The CRCs are taken from the record sizes as the directory gives them.
#include <zlib.h>

#include <cstddef>
#include <cstdint>

namespace blpa_test {

inline uint64_t zip_le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[i];
  return v;
}

inline void fix_zip_crcs(uint8_t* data, size_t size) {
  auto put_le32 = [](uint8_t* p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
  };
  for (size_t i = 0; i + 46 <= size; ++i) {
    if (zip_le(data + i, 4) != 0x02014b50) continue;
    const uint8_t* h = data + i;
    const uint64_t local = zip_le(h + 42, 4), compressed = zip_le(h + 20, 4);
    if (zip_le(h + 10, 2) != 0 || local + 30 > size || zip_le(data + local, 4) != 0x04034b50) continue;
    const uint64_t start = local + 30 + zip_le(data + local + 26, 2) + zip_le(data + local + 28, 2);
    if (start > size || compressed > size - start) continue;
    const uint32_t crc = static_cast<uint32_t>(crc32(0, data + start, static_cast<uInt>(compressed)));
    put_le32(data + i + 16, crc);
    put_le32(data + local + 14, crc);
  }
}

}  // namespace blpa_test
