#include "blpa/imagenet.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numbers>
#include <stdexcept>

namespace blpa::data {

// ---- geometry ------------------------------------------------------------------------------

namespace {

// The source box that becomes a crop x crop window at (cx, cy) of the image resized by f.
CropBox source_box(int w, int h, double f, double cx, double cy, int crop) {
  CropBox b;
  b.w = std::clamp(static_cast<int>(std::lround(crop / f)), 1, w);
  b.h = std::clamp(static_cast<int>(std::lround(crop / f)), 1, h);
  b.x = std::clamp(static_cast<int>(std::lround(cx / f)), 0, w - b.w);
  b.y = std::clamp(static_cast<int>(std::lround(cy / f)), 0, h - b.h);
  return b;
}

std::array<float, 9> inverse(const std::array<float, 9>& a) {  // 3 x 3, by cofactors
  auto at = [&](int r, int c) { return static_cast<double>(a[r * 3 + c]); };
  std::array<double, 9> cof{};
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c)
      cof[c * 3 + r] = at((r + 1) % 3, (c + 1) % 3) * at((r + 2) % 3, (c + 2) % 3) -
                       at((r + 1) % 3, (c + 2) % 3) * at((r + 2) % 3, (c + 1) % 3);
  const double det = at(0, 0) * cof[0] + at(0, 1) * cof[3] + at(0, 2) * cof[6];
  std::array<float, 9> out{};
  for (int i = 0; i < 9; ++i) out[i] = static_cast<float>(cof[i] / det);
  return out;
}

double uniform(uint64_t key, uint64_t salt) {  // in [0, 1)
  return static_cast<double>(counter_hash(key, salt) >> 11) * 0x1.0p-53;
}

}  // namespace

int train_short_side(const ImageNetAugment& a, uint64_t key) {
  return a.min_short + static_cast<int>(counter_hash(key, 1) % static_cast<uint64_t>(a.max_short - a.min_short + 1));
}

TrainView train_view(int w, int h, const ImageNetAugment& a, uint64_t key) {
  TrainView v;
  v.short_side = train_short_side(a, key);
  const double f = static_cast<double>(v.short_side) / std::min(w, h);
  const double rw = w * f, rh = h * f;  // the resized image
  const double cx = std::max(0.0, rw - a.crop) * uniform(key, 2), cy = std::max(0.0, rh - a.crop) * uniform(key, 3);
  v.box = source_box(w, h, f, cx, cy, a.crop);
  v.flip = a.flip && (counter_hash(key, 4) & 1);
  return v;
}

CropBox center_crop_box(int w, int h, int resize_short, int crop) {
  const double f = static_cast<double>(resize_short) / std::min(w, h);
  return source_box(w, h, f, (w * f - crop) / 2, (h * f - crop) / 2, crop);
}

std::array<CropBox, 5> five_crop_boxes(int w, int h, int resize_short, int crop) {
  const double f = static_cast<double>(resize_short) / std::min(w, h);
  const double right = w * f - crop, bottom = h * f - crop;
  return {source_box(w, h, f, 0, 0, crop), source_box(w, h, f, right, 0, crop), source_box(w, h, f, 0, bottom, crop),
          source_box(w, h, f, right, bottom, crop), center_crop_box(w, h, resize_short, crop)};
}

at::Tensor resize_crop(const Image& img, const CropBox& box, int out, bool flip) {
  auto whole = at::from_blob(const_cast<uint8_t*>(img.rgb.data()), {img.height, img.width, 3}, at::kByte);
  auto crop = whole.narrow(0, box.y, box.h).narrow(1, box.x, box.w).permute({2, 0, 1}).unsqueeze(0).to(at::kFloat);
  // Antialiased bilinear (a triangle filter widened by the shrink factor), as PIL and
  // torchvision's antialias=True resize; for enlargement it is plain bilinear.
  auto r = (box.w == out && box.h == out)
               ? crop
               : at::_upsample_bilinear2d_aa(crop, {out, out}, /*align_corners=*/false, std::nullopt, std::nullopt);
  r = r.squeeze(0);
  return flip ? r.flip({2}) : r.contiguous();
}

ColourMap jitter_map(const Jitter& j, float mean_grey, uint64_t key) {
  auto factor = [&](float s, uint64_t salt) { return static_cast<float>(1.0 - s + 2.0 * s * uniform(key, salt)); };
  const float b = factor(j.brightness, 11), c = factor(j.contrast, 12), s = factor(j.saturation, 13);
  const float hue = static_cast<float>((2.0 * uniform(key, 14) - 1.0) * j.hue);
  using M3 = std::array<float, 9>;
  auto mul = [](const M3& x, const M3& y) {
    M3 z{};
    for (int r = 0; r < 3; ++r)
      for (int k = 0; k < 3; ++k)
        for (int q = 0; q < 3; ++q) z[r * 3 + q] += x[r * 3 + k] * y[k * 3 + q];
    return z;
  };
  const float L[3] = {0.299f, 0.587f, 0.114f};  // luma, as torchvision's rgb_to_grayscale
  // saturation: grey + s (rgb - grey), grey = L . rgb
  M3 S{};
  for (int r = 0; r < 3; ++r)
    for (int q = 0; q < 3; ++q) S[r * 3 + q] = (r == q ? s : 0.0f) + (1 - s) * L[q];
  // hue: a rotation of the chroma plane of YIQ by 2 pi hue (luma unchanged)
  const M3 T{0.299f, 0.587f, 0.114f, 0.596f, -0.274f, -0.322f, 0.211f, -0.523f, 0.312f};
  const M3 Ti = inverse(T);  // exact, so hue 0 is the identity and greys stay grey
  const float th = 2.0f * std::numbers::pi_v<float> * hue, cs = std::cos(th), sn = std::sin(th);
  const M3 R{1, 0, 0, 0, cs, -sn, 0, sn, cs};
  const M3 HS = mul(mul(Ti, mul(R, T)), S);
  // brightness then contrast: c (b rgb - g) + g with g the mean grey after brightness
  ColourMap out;
  for (int i = 0; i < 9; ++i) out.m[i] = HS[i] * b * c;
  const float g = (1 - c) * b * mean_grey;
  for (int r = 0; r < 3; ++r) out.o[r] = (HS[r * 3] + HS[r * 3 + 1] + HS[r * 3 + 2]) * g;
  return out;
}

Normalisation imagenet_normalisation() { return {{0.485f, 0.456f, 0.406f}, {0.229f, 0.224f, 0.225f}}; }

// ---- batches -------------------------------------------------------------------------------

namespace {

// 3 x S x S floats in [0, 255] -> normalised, after an optional colour map (values in [0, 1]).
void finish(const at::Tensor& crop, const ColourMap* map, const Normalisation& norm, const at::Tensor& dst) {
  auto x = crop.reshape({3, -1}).div(255.0f);
  if (map) {
    auto m = at::from_blob(const_cast<float*>(map->m.data()), {3, 3}, at::kFloat);
    auto o = at::from_blob(const_cast<float*>(map->o.data()), {3, 1}, at::kFloat);
    x = at::addmm(o, m, x).clamp_(0.0f, 1.0f);
  }
  auto mean = at::from_blob(const_cast<float*>(norm.mean.data()), {3, 1}, at::kFloat);
  auto std = at::from_blob(const_cast<float*>(norm.std.data()), {3, 1}, at::kFloat);
  dst.copy_(x.sub_(mean).div_(std).view(dst.sizes()));
}

float mean_grey(const at::Tensor& crop) {  // of a 3 x S x S crop in [0, 255], in [0, 1]
  auto means = crop.reshape({3, -1}).mean(1);
  const float* p = means.data_ptr<float>();
  return (0.299f * p[0] + 0.587f * p[1] + 0.114f * p[2]) / 255.0f;
}

void note(DecodeErrors* errors, const std::string& path, const Decoded& d) {
  if (!errors) return;
  ++errors->count;
  std::lock_guard<std::mutex> lock(errors->mutex);
  if (errors->seen.insert(path).second && errors->files++ < 10)
    std::fprintf(stderr, "warning: %s: skipped (%s%s%s)\n", path.c_str(), to_string(d.status),
                 d.message.empty() ? "" : ": ", d.message.c_str());
}

}  // namespace

Batch imagenet_train_batch(const ImageList& list, const std::vector<int64_t>& indices, const ImageNetAugment& a,
                           const Normalisation& norm, uint64_t stream, DecodeErrors* errors, bool pinned) {
  const int64_t B = static_cast<int64_t>(indices.size());
  Batch out{at::empty({B, 3, a.crop, a.crop}, at::TensorOptions().pinned_memory(pinned)),
            at::empty({B}, at::TensorOptions(at::kLong).pinned_memory(pinned))};
  int64_t* labels = out.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    const uint64_t key = counter_hash(stream, static_cast<uint64_t>(indices[i]));
    const int short_side = train_short_side(a, key);  // decoded at the smallest DCT scale that keeps it
    // An image that does not decode is replaced by one drawn from the list at random (a
    // function of the same key), not by its neighbour: a class folder of undecodable files
    // must not make a long run of failures. 100 in a row: most of the images are unreadable.
    for (int64_t tries = 0, idx = indices[i];; ++tries) {
      if (tries > 0) idx = static_cast<int64_t>(counter_hash(key, 100 + tries) % static_cast<uint64_t>(list.size()));
      const std::string path = list.path(idx);
      Decoded d = decode_jpeg_file(path, short_side);
      if (d.status != DecodeStatus::ok) {
        note(errors, path, d);
        out.failed.push_back(idx);
        if (tries == 99)
          throw std::runtime_error(list.root + ": 100 images tried in a row could not be read or decoded (the last: " +
                                   list.paths[idx] + ", " + to_string(d.status) + "): most of its images are not " +
                                   (list.classes.empty() ? "there or not JPEGs: are the list's paths relative to "
                                                           "this folder?"
                                                         : "JPEGs that can be read"));
        continue;
      }
      const TrainView v = train_view(d.image.width, d.image.height, a, key);
      auto crop = resize_crop(d.image, v.box, a.crop, v.flip);
      ColourMap map;
      if (a.jitter_on) map = jitter_map(a.jitter, mean_grey(crop), key);
      finish(crop, a.jitter_on ? &map : nullptr, norm, out.images[i]);
      labels[i] = list.labels[idx];
      break;
    }
  }
  return out;
}

Batch imagenet_eval_batch(const ImageList& list, int64_t first, int64_t count, int resize_short, int crop,
                          bool ten_crop, const Normalisation& norm, DecodeErrors* errors, bool pinned) {
  const int64_t views = ten_crop ? 10 : 1;
  Batch out{at::zeros({count * views, 3, crop, crop}, at::TensorOptions().pinned_memory(pinned)),
            at::empty({count}, at::kLong)};
  int64_t* labels = out.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    const std::string path = list.path(first + i);
    Decoded d = decode_jpeg_file(path, resize_short);
    if (d.status != DecodeStatus::ok) {  // left out of the accuracy: label -1
      note(errors, path, d);
      labels[i] = -1;
      continue;
    }
    labels[i] = list.labels[first + i];
    eval_views(d.image, resize_short, crop, ten_crop, norm, out.images.narrow(0, i * views, views));
  }
  return out;
}

void eval_views(const Image& img, int resize_short, int crop, bool ten_crop, const Normalisation& norm,
                const at::Tensor& dst) {
  const int w = img.width, h = img.height;
  if (!ten_crop) {
    finish(resize_crop(img, center_crop_box(w, h, resize_short, crop), crop, false), nullptr, norm, dst[0]);
    return;
  }
  const auto boxes = five_crop_boxes(w, h, resize_short, crop);
  for (int k = 0; k < 5; ++k) {
    auto c = resize_crop(img, boxes[k], crop, false);
    finish(c, nullptr, norm, dst[k]);
    finish(c.flip({2}), nullptr, norm, dst[5 + k]);
  }
}

}  // namespace blpa::data
