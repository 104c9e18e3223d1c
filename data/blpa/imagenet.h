// ImageNet-style data: folders of JPEGs (or a list file; image_index.h finds them), decoded
// by libjpeg-turbo in worker threads, with the paper's augmentation (DESIGN.md 1.7) and
// 10-crop evaluation.
//
// Layout: <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, or list files of
// "relative/path,label" lines (paths relative to the list's directory unless --data-dir says
// otherwise).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "blpa/image_index.h"
#include "blpa/jpeg.h"
#include "blpa/loader.h"

namespace blpa::data {

// ---- geometry ------------------------------------------------------------------------------
// A crop in the pixel grid of the decoded image.
struct CropBox {
  int x = 0, y = 0, w = 0, h = 0;
  bool operator==(const CropBox&) const = default;
};

struct Jitter {  // colour jitter strengths, torchvision's ColorJitter convention
  float brightness = 0.4f, contrast = 0.4f, saturation = 0.4f, hue = 0.1f;
};

struct ImageNetAugment {
  int min_short = 256, max_short = 480;  // the shorter side is resized to a value in [min, max]
  int crop = 224;
  bool flip = true;
  Jitter jitter;
  bool jitter_on = true;
};

// The training view of an image of size w x h for the given random key: the box of the
// source that becomes the crop x crop output once the shorter side is resized to a random
// length in [min_short, max_short], and whether to mirror it.
struct TrainView {
  CropBox box;
  bool flip = false;
  int short_side = 0;
};
TrainView train_view(int w, int h, const ImageNetAugment& a, uint64_t key);
// The random shorter side of train_view, which depends on the key alone (so the decoder can
// pick its DCT scale before the image's size is known).
int train_short_side(const ImageNetAugment& a, uint64_t key);

// Evaluation: the shorter side resized to `resize_short`, then crops of `crop` pixels.
// Centre crop, and the five crops of the 10-crop protocol in the order top-left,
// top-right, bottom-left, bottom-right, centre (the other five are their mirrors).
CropBox center_crop_box(int w, int h, int resize_short, int crop);
std::array<CropBox, 5> five_crop_boxes(int w, int h, int resize_short, int crop);

// Resamples `box` of the image to out x out (bilinear, antialiased when shrinking), mirrored
// if `flip`: float32, 3 x out x out, values in [0, 255].
at::Tensor resize_crop(const Image& img, const CropBox& box, int out, bool flip);

// Brightness, contrast, saturation and hue as one affine colour map, drawn for `key`:
// rgb' = m * rgb + o, with rgb in [0, 1]. Contrast needs the image's mean grey.
struct ColourMap {
  std::array<float, 9> m{1, 0, 0, 0, 1, 0, 0, 0, 1};
  std::array<float, 3> o{0, 0, 0};
};
ColourMap jitter_map(const Jitter& j, float mean_grey, uint64_t key);

// ImageNet's channel mean and standard deviation (of pixel / 255), the usual constants.
Normalisation imagenet_normalisation();

// ---- batches -------------------------------------------------------------------------------
// Counts the images that could not be decoded: `count` the failed decodes (in evaluation, the
// images left out), `files` the files among them, each counted and named (the first ten) once
// however often it is drawn. In training each is replaced in its batch by an image drawn
// from the list at random that decodes (so a batch keeps its size).
struct DecodeErrors {
  std::atomic<int64_t> count{0}, files{0};
  std::mutex mutex;
  std::unordered_set<std::string> seen;  // under mutex
};

// Training batch `b` of the list (order and augmentation a pure function of seed and b),
// normalised float32 B x 3 x crop x crop. `pinned`: images and labels are made in pinned
// host memory (for asynchronous copies to a GPU; needs CUDA).
Batch imagenet_train_batch(const ImageList& list, const std::vector<int64_t>& indices, const ImageNetAugment& a,
                           const Normalisation& norm, uint64_t stream, DecodeErrors* errors, bool pinned = false);

// Evaluation batch: each image's centre crop (`ten_crop` false: B x 3 x crop x crop) or its
// ten crops (B*10 x ..., image i's crops at rows 10i..10i+9).
Batch imagenet_eval_batch(const ImageList& list, int64_t first, int64_t count, int resize_short, int crop,
                          bool ten_crop, const Normalisation& norm, DecodeErrors* errors, bool pinned = false);

// The evaluation views of one decoded image, as imagenet_eval_batch makes them, written to
// `dst` (1 or, with `ten_crop`, 10 x 3 x crop x crop).
void eval_views(const Image& img, int resize_short, int crop, bool ten_crop, const Normalisation& norm,
                const at::Tensor& dst);

}  // namespace blpa::data
