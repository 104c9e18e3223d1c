// The ImageNet pipeline: folder scan, labels, cache, bad files, crop geometry, colour jitter,
// 10-crop batches and gradient accumulation.
#include <blpa/checkpoint.h>
#include <blpa/imagenet.h>
#include <blpa/jpeg.h>
#include <blpa/train.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <regex>
#include <set>
#include <sstream>

#include "test_support.h"

namespace fs = std::filesystem;
using namespace blpa::data;

namespace {

fs::path temp_tree(const std::string& tag) {
  static int n = 0;
  const fs::path p = fs::temp_directory_path() / ("blpa-imagenet-" + tag + "-" + std::to_string(::getpid()) + "-" +
                                                   std::to_string(n++));
  fs::create_directories(p);
  return p;
}

void write_bytes(const fs::path& p, const std::vector<uint8_t>& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// A w x h RGB image whose red channel grows with x and green with y, blue a function of seed.
Image gradient(int w, int h, int seed = 0) {
  Image img{w, h, std::vector<uint8_t>(size_t(w) * h * 3)};
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* p = &img.rgb[(size_t(y) * w + x) * 3];
      p[0] = static_cast<uint8_t>(x * 255 / std::max(1, w - 1));
      p[1] = static_cast<uint8_t>(y * 255 / std::max(1, h - 1));
      p[2] = static_cast<uint8_t>((seed * 37) % 256);
    }
  return img;
}

std::vector<uint8_t> jpeg_of(int w, int h, int seed) {
  const Image img = gradient(w, h, seed);
  return encode_jpeg(img.rgb.data(), w, h, JpegPixels::rgb, 90);
}

}  // namespace

TEST_CASE("imagenet: classes are numbered in sorted wnid order and the index cache follows the tree", "[imagenet]") {
  const fs::path root = temp_tree("scan");
  const fs::path train = root / "train";
  write_bytes(train / "n03" / "c1.JPEG", jpeg_of(40, 30, 1));
  write_bytes(train / "n01" / "a1.JPEG", jpeg_of(40, 30, 2));
  write_bytes(train / "n01" / "a2.jpg", jpeg_of(40, 30, 3));
  write_bytes(train / "n01" / "notes.txt", {'x'});
  write_bytes(train / "n02" / "b1.jpeg", jpeg_of(40, 30, 4));
  fs::create_directories(train / "n04");  // an empty class
  write_bytes(train / "stray.JPEG", jpeg_of(40, 30, 7));  // outside any class: left out, and said
  const std::string cache = (root / "cache" / "nested").string();  // created as needed

  ScanReport r;
  auto list = scan_image_folder(train.string(), cache, 3, &r);
  {  // a relative cache folder is made as `mkdir -p` makes it: no folder of its first letter beside it
    const fs::path cwd = fs::current_path();
    fs::current_path(root);
    scan_image_folder(train.string(), "rel/cache", 1, nullptr);
    fs::current_path(cwd);
    CHECK(fs::is_directory(root / "rel" / "cache"));
    CHECK_FALSE(fs::exists(root / "r"));
  }
  CHECK(list.classes == std::vector<std::string>{"n01", "n02", "n03", "n04"});
  CHECK(list.num_classes == 4);
  REQUIRE(list.size() == 4);
  CHECK(list.paths == std::vector<std::string>{"n01/a1.JPEG", "n01/a2.jpg", "n02/b1.jpeg", "n03/c1.JPEG"});
  CHECK(list.labels == std::vector<int64_t>{0, 0, 1, 2});
  CHECK(r.empty_classes == std::vector<std::string>{"n04"});
  CHECK(r.skipped == 1);
  CHECK(r.loose == std::vector<std::string>{"stray.JPEG"});
  CHECK_FALSE(r.from_cache);

  auto again = scan_image_folder(train.string(), cache, 1, &r);
  CHECK(r.from_cache);
  CHECK(again.paths == list.paths);
  CHECK(again.labels == list.labels);
  // What the scan reported is reported again from the cache, by a run that did not scan.
  CHECK(r.empty_classes == std::vector<std::string>{"n04"});
  CHECK(r.skipped == 1);
  CHECK(r.files == 4);
  CHECK(r.loose == std::vector<std::string>{"stray.JPEG"});

  // A new image changes its class folder's modification time: the cache no longer applies.
  ::usleep(20000);
  write_bytes(train / "n04" / "d1.JPEG", jpeg_of(40, 30, 5));
  std::ofstream(fs::path(cache) / "image-index-0123456789abcdef.txt") << "x";  // named as before: never read again
  auto grown = scan_image_folder(train.string(), cache, 2, &r);
  CHECK_FALSE(r.from_cache);
  CHECK(grown.size() == 5);
  CHECK(grown.labels.back() == 3);
  CHECK(r.empty_classes.empty());
  // The list of the folder before the change is gone from the cache (one a change, each as
  // large as the list: ImageNet's is some 45 MB).
  int cached = 0;
  for (const auto& e : fs::directory_iterator(cache))
    cached += e.path().filename().string().rfind("image-index-", 0) == 0;
  CHECK(cached == 1);

  // A copy that keeps times (rsync -a, cp -p) adds an image and then sets its folder's
  // modification time back; the folder's status-change time still moves, so the cache is
  // not taken for the folder's new state.
  scan_image_folder(train.string(), cache, 1, &r);
  REQUIRE(r.from_cache);
  struct stat before {};
  REQUIRE(::stat((train / "n02").c_str(), &before) == 0);
  ::usleep(20000);
  write_bytes(train / "n02" / "b2.jpeg", jpeg_of(40, 30, 6));
  const timespec times[2] = {before.st_atim, before.st_mtim};
  REQUIRE(::utimensat(AT_FDCWD, (train / "n02").c_str(), times, 0) == 0);
  struct stat after {};
  REQUIRE(::stat((train / "n02").c_str(), &after) == 0);
  auto copied = scan_image_folder(train.string(), cache, 1, &r);
  if (after.st_ctim.tv_sec != before.st_ctim.tv_sec || after.st_ctim.tv_nsec != before.st_ctim.tv_nsec) {
    CHECK_FALSE(r.from_cache);
    CHECK(copied.size() == 6);
  } else  // a file system whose times are coarser than the 20 ms slept: nothing tells the states apart
    WARN("the folder's status-change time did not move in 20 ms: the cache check is skipped");

  if (::geteuid() != 0) {  // root reads everything: the check needs an ordinary user
    ::chmod((train / "n02" / "b1.jpeg").c_str(), 0);
    auto without = scan_image_folder(train.string(), "", 2, &r);
    CHECK(r.unreadable == std::vector<std::string>{"n02/b1.jpeg"});
    CHECK(without.size() == 5);  // the 6 images less the unreadable one
  }
  // ImageNet's validation images as they come, in one folder: named, with what to do.
  write_bytes(root / "flat" / "ILSVRC2012_val_00000001.JPEG", jpeg_of(40, 30, 8));
  write_bytes(root / "flat" / "ILSVRC2012_val_00000002.JPEG", jpeg_of(40, 30, 9));
  CHECK_THROWS_WITH(scan_image_folder((root / "flat").string(), "", 1, &r),
                    Catch::Contains(": no class folders (expected ") &&
                        Catch::Contains("; its 2 images (first: ILSVRC2012_val_00000001.JPEG) must be sorted "
                                        "into one folder per class"));
  remove_tree(root);
}

TEST_CASE("imagenet: splits with different classes are refused and a list file is parsed strictly", "[imagenet]") {
  const fs::path root = temp_tree("splits");
  write_bytes(root / "train" / "n01" / "a.JPEG", jpeg_of(20, 20, 1));
  write_bytes(root / "train" / "n02" / "b.JPEG", jpeg_of(20, 20, 2));
  write_bytes(root / "val" / "n01" / "a.JPEG", jpeg_of(20, 20, 3));
  CHECK_THROWS_WITH(load_imagenet(root.string(), "", 2),
                    Catch::Contains("train/ has 2 classes and val/ 1, which must be the same folders; only in "
                                    "train/: n02"));
  write_bytes(root / "val" / "n03" / "c.JPEG", jpeg_of(20, 20, 4));  // as many, one named otherwise
  CHECK_THROWS_WITH(load_imagenet(root.string(), "", 2),
                    Catch::Contains("train/ has 2 classes and val/ 2, which must be the same folders; only in "
                                    "train/: n02; only in val/: n03"));
  // The same folders, one of train/'s empty where val/'s has images: never trained, so refused.
  fs::remove_all(root / "val" / "n03");
  write_bytes(root / "val" / "n02" / "b.JPEG", jpeg_of(20, 20, 5));
  fs::remove(root / "train" / "n02" / "b.JPEG");
  CHECK_THROWS_WITH(load_imagenet(root.string(), "", 2),
                    Catch::Contains("class folder train/n02 has no images, val/n02 has some: the network would be "
                                    "scored on a class it was never trained on"));
  CHECK_THROWS_WITH(scan_image_folder((root / "missing").string(), "", 1, nullptr), Catch::Contains("missing"));

  std::ofstream(root / "list.csv") << "# path,label\nn01/a.JPEG,0\n\nweird,name.JPEG,7\n";
  auto l = read_image_list((root / "list.csv").string(), "");
  CHECK(l.paths == std::vector<std::string>{"n01/a.JPEG", "weird,name.JPEG"});
  CHECK(l.labels == std::vector<int64_t>{0, 7});
  CHECK(l.num_classes == 8);
  CHECK(l.root == root.string());
  // A byte-order mark, Windows line ends and spaces around the comma, read as blpa-predict's
  // --list reads them (the same split_list_line).
  std::istringstream spaced("\xEF\xBB\xBFn01/a.JPEG , 3\r\n  n01/b.JPEG,\t4 \r\n");  // the second indented
  auto s = parse_image_list(spaced, "spaced", "");
  CHECK(s.paths == std::vector<std::string>{"n01/a.JPEG", "n01/b.JPEG"});
  CHECK(s.labels == std::vector<int64_t>{3, 4});
  // Lines ended by CR alone: one "line" of the whole file, refused as such (it was taken for
  // one huge path, then "its first image ... is not at" 15 MB of it).
  std::istringstream cr_only("n01/a.JPEG,3\rn01/b.JPEG,4\r");
  CHECK_THROWS_WITH(parse_image_list(cr_only, "cr", ""),
                    Catch::Contains("cr:1: has lines ended by a carriage return alone ('n01/a.JPEG,3\\x0dn01/b.JPEG"));
  std::istringstream no_path(" ,3\n");
  CHECK_THROWS_WITH(parse_image_list(no_path, "no-path", ""),
                    Catch::Contains("no-path:1: expected 'relative/path,label'"));
  std::ofstream(root / "bad.csv") << "n01/a.JPEG,0\nn01/b.JPEG\n";
  CHECK_THROWS_WITH(read_image_list((root / "bad.csv").string(), ""), Catch::Contains("bad.csv:2"));
  std::ofstream(root / "neg.csv") << "n01/a.JPEG,-1\n";
  CHECK_THROWS_WITH(read_image_list((root / "neg.csv").string(), ""), Catch::Contains("label >= 0"));
  remove_tree(root);
}

TEST_CASE("imagenet: subsets keep every class and lists take comments, blanks and absolute paths", "[imagenet]") {
  auto list_of = [](std::vector<int64_t> labels) {
    ImageList l;
    for (size_t i = 0; i < labels.size(); ++i) l.paths.push_back(fmt::format("p{}", i));
    l.labels = std::move(labels);
    l.num_classes = 1 + *std::max_element(l.labels.begin(), l.labels.end());
    return l;
  };
  std::vector<int64_t> sizes_20_1_20(20, 0);
  sizes_20_1_20.push_back(1);
  sizes_20_1_20.insert(sizes_20_1_20.end(), 20, 2);
  // One image of each class, where every 14th entry of the 41 would have missed class 1.
  CHECK(spread_subset(list_of(sizes_20_1_20), 3).labels == std::vector<int64_t>{0, 1, 2});
  // Class 1 has one image to give: the other two share the rest; the list's order is kept.
  const ImageList six = spread_subset(list_of(sizes_20_1_20), 6);
  CHECK(six.labels == std::vector<int64_t>{0, 0, 1, 2, 2, 2});
  CHECK(six.paths == std::vector<std::string>{"p0", "p10", "p20", "p21", "p27", "p34"});
  // Classes of one size and N a multiple of their number: every (size / N)-th entry.
  const ImageList even = spread_subset(list_of({0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2}), 6);
  CHECK(even.paths == std::vector<std::string>{"p0", "p2", "p4", "p6", "p8", "p10"});
  // A list file's interleaved labels: spread per label, in the list's order.
  CHECK(spread_subset(list_of({0, 1, 0, 1, 0, 1, 0, 1}), 2).paths == std::vector<std::string>{"p0", "p1"});
  CHECK(spread_subset(list_of({0, 1, 2}), 0).size() == 3);
  CHECK(spread_subset(list_of({0, 1, 2}), 5).size() == 3);

  std::istringstream commented("  # an indented comment\n \t \nn01/a.JPEG,0\n/data/x/b.JPEG,1\n");
  const ImageList l = parse_image_list(commented, "commented", "/root");
  CHECK(l.paths == std::vector<std::string>{"n01/a.JPEG", "/data/x/b.JPEG"});
  CHECK(l.path(0) == "/root/n01/a.JPEG");
  CHECK(l.path(1) == "/data/x/b.JPEG");
  std::istringstream utf16(std::string("\xFF\xFEn\0" "0\0" "1\0/\0a\0,\0" "0\0\n\0", 18));
  CHECK_THROWS_WITH(parse_image_list(utf16, "wide.txt", ""), Catch::Contains("wide.txt:1: is UTF-16 text") &&
                                                                  Catch::Contains("save it as UTF-8"));
}

// A class folder of files that are not JPEGs (HEIC or WebP under .jpg names, say) is not a run
// of failures: each is replaced by an image drawn at random. A folder of nothing else stops.
TEST_CASE("imagenet: undecodable images are replaced by random ones and the cache keeps the scan's report",
          "[imagenet]") {
  const fs::path root = temp_tree("bad-class");
  for (int i = 0; i < 300; ++i) write_bytes(root / "n01" / fmt::format("g{}.JPEG", i), jpeg_of(16, 16, i));
  for (int i = 0; i < 120; ++i) write_bytes(root / "n02" / ("heic" + std::to_string(i) + ".jpg"), {'f', 't', 'y', 'p'});
  const ImageList list = scan_image_folder(root.string(), "", 2, nullptr);
  REQUIRE(list.size() == 420);
  ImageNetAugment a;
  a.min_short = a.max_short = 20;
  a.crop = 16;
  std::vector<int64_t> bad_class;
  for (int64_t i = 300; i < 420; ++i) bad_class.push_back(i);
  DecodeErrors errors;
  const Batch b = imagenet_train_batch(list, bad_class, a, imagenet_normalisation(), 7, &errors);
  CHECK(errors.count.load() > 120);  // each image of the class, and the draws that hit the class again
  CHECK(errors.files.load() == 120);  // each file once
  CHECK(b.labels.eq(0).all().item<bool>());  // every replacement is an image of n01
  const auto again = imagenet_train_batch(list, bad_class, a, imagenet_normalisation(), 7, nullptr);
  CHECK(torch::equal(again.images, b.images));  // the draws are a function of (stream, index)

  const fs::path bad = root / "only-bad";
  for (int i = 0; i < 5; ++i) write_bytes(bad / "n01" / ("x" + std::to_string(i) + ".JPEG"), {'x'});
  const ImageList none = scan_image_folder(bad.string(), "", 1, nullptr);
  CHECK_THROWS_WITH(imagenet_train_batch(none, {0}, a, imagenet_normalisation(), 7, nullptr),
                    Catch::Contains(bad.string() + ": 100 images tried in a row could not be read or decoded") &&
                        Catch::Contains("most of its images are not JPEGs that can be read"));

  // An image the scan could not read is reported by runs that read the cache too, until it
  // can be read: then the folder is scanned again (a link whose target has come changes no
  // folder's times).
  const fs::path tree = root / "tree", cache = root / "cache";
  write_bytes(tree / "n01" / "a.JPEG", jpeg_of(16, 16, 1));
  fs::create_directories(tree / "n02");
  fs::create_symlink(root / "later.JPEG", tree / "n02" / "link.JPEG");
  ScanReport r;
  scan_image_folder(tree.string(), cache.string(), 1, &r);
  CHECK_FALSE(r.from_cache);
  CHECK(r.unreadable == std::vector<std::string>{"n02/link.JPEG"});
  CHECK(r.empty_classes == std::vector<std::string>{"n02"});
  scan_image_folder(tree.string(), cache.string(), 1, &r);
  CHECK(r.from_cache);
  CHECK(r.unreadable == std::vector<std::string>{"n02/link.JPEG"});
  CHECK(r.empty_classes == std::vector<std::string>{"n02"});
  write_bytes(root / "later.JPEG", jpeg_of(16, 16, 2));
  const ImageList grown = scan_image_folder(tree.string(), cache.string(), 1, &r);
  CHECK_FALSE(r.from_cache);
  CHECK(r.cache_refused.empty());
  CHECK(grown.size() == 2);
  CHECK(r.unreadable.empty());
  remove_tree(root);
}

TEST_CASE("imagenet: labels from list files are bounded and the index cache cannot lead outside the folder", "[imagenet]") {
  const fs::path root = temp_tree("bounds");
  // A label that would make 100000000000 classes, one beyond int64, and a folder for a file.
  std::ofstream(root / "big.csv") << "n01/a.JPEG,0\nn01/b.JPEG,99999999999\n";
  CHECK_THROWS_WITH(read_image_list((root / "big.csv").string(), ""),
                    Catch::Contains("big.csv:2: label 99999999999 is above the limit of 99999"));
  std::ofstream(root / "huge.csv") << "a.JPEG,99999999999999999999999\n";
  CHECK_THROWS_WITH(read_image_list((root / "huge.csv").string(), ""), Catch::Contains("huge.csv:1: label 9999"));
  std::ofstream(root / "max.csv") << "a.JPEG," << kMaxClasses - 1 << "\n";
  CHECK(read_image_list((root / "max.csv").string(), "").num_classes == kMaxClasses);
  fs::create_directories(root / "dir.csv");
  CHECK_THROWS_WITH(read_image_list((root / "dir.csv").string(), ""), Catch::Contains("dir.csv: is a directory"));

  // A crafted entry in the cache of a scanned folder is refused, named, and the folder scanned again.
  const fs::path train = root / "train", cache = root / "cache";
  write_bytes(train / "n01" / "a.JPEG", jpeg_of(20, 20, 1));
  write_bytes(train / "n02" / "b.JPEG", jpeg_of(20, 20, 2));
  ScanReport r;
  const ImageList honest = scan_image_folder(train.string(), cache.string(), 1, &r);
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(cache)) files.push_back(e.path());
  REQUIRE(files.size() == 1);
  std::ofstream(files[0]) << "blpa-image-index 2\n2 2 0 0\n0\tn01/a.JPEG\n1\t../../etc/passwd.JPEG\n";
  const ImageList again = scan_image_folder(train.string(), cache.string(), 1, &r);
  CHECK_FALSE(r.from_cache);
  CHECK_THAT(r.cache_refused, Catch::Contains(files[0].string() + ": line 4: '../../etc/passwd.JPEG' is not an image "
                                                                   "file directly inside class folder n02"));
  CHECK(again.paths == honest.paths);
  scan_image_folder(train.string(), cache.string(), 1, &r);  // the scan rewrote the cache
  CHECK(r.from_cache);
  CHECK(r.cache_refused.empty());
  CHECK(r.cache_unwritten.empty());
  // A cache folder that cannot take the index (here a file stands where it should be): the
  // scan works, and the report says why nothing was cached.
  std::ofstream(root / "not-a-folder") << "x";
  scan_image_folder(train.string(), (root / "not-a-folder").string(), 1, &r);
  CHECK_FALSE(r.from_cache);
  CHECK_THAT(r.cache_unwritten, Catch::Contains((root / "not-a-folder").string() + "/image-index-") &&
                                    Catch::Contains(": cannot be written (Not a directory)"));

  // An index of format 1 (an earlier blpa) is scanned again without a word, and rewritten.
  std::ofstream(files[0]) << "blpa-image-index 1\n2 2\n0\tn01/a.JPEG\n1\tn02/b.JPEG\n";
  scan_image_folder(train.string(), cache.string(), 1, &r);
  CHECK_FALSE(r.from_cache);
  CHECK(r.cache_refused.empty());
  scan_image_folder(train.string(), cache.string(), 1, &r);
  CHECK(r.from_cache);

  // What the parser takes: only "[u]<label>\t<class of the label>/<image file name>".
  const std::vector<std::string> classes = {"n01", "n02"};
  auto parse = [&](const std::string& entries, int64_t count, int64_t unreadable = 0) {
    std::istringstream in("blpa-image-index 2\n2 " + std::to_string(count) + " 3 " + std::to_string(unreadable) +
                          "\n" + entries);
    ImageList out;
    return parse_image_index(in, classes, out);
  };
  CHECK(parse("0\tn01/a.JPEG\nu1\tn02/gone.JPEG\n", 1, 1).empty());
  CHECK_THAT(parse("u1\tn02/../x.JPEG\n", 0, 1), Catch::Contains("line 3: 'n02/../x.JPEG' is not an image file"));
  CHECK_THAT(parse("u1\tn02/a.JPEG\n", 0, 0), Catch::Contains("line 3: more unreadable images than the 0"));
  CHECK_THAT(parse("0\tn01/a.JPEG\n", 1, 1), Catch::Contains("0 of the 1 unreadable ones"));
  CHECK_THAT(parse("u\tn02/a.JPEG\n", 0, 1), Catch::Contains("line 3: expected '[u]<label below 2>"));
  CHECK(parse("0\tn01/a.JPEG\n1\tn02/b.jpg\n", 2).empty());
  CHECK_THAT(parse("1\tn02/../../x.JPEG\n", 1), Catch::Contains("line 3: 'n02/../../x.JPEG' is not an image file"));
  CHECK_THAT(parse("0\t/etc/passwd.JPEG\n", 1), Catch::Contains("is not an image file"));
  CHECK_THAT(parse("0\tn02/b.JPEG\n", 1), Catch::Contains("inside class folder n01 (label 0)"));
  CHECK_THAT(parse("0\tn01/..\n", 1), Catch::Contains("is not an image file"));
  CHECK_THAT(parse("0\tn01/notes.txt\n", 1), Catch::Contains("is not an image file"));
  CHECK_THAT(parse("2\tn01/a.JPEG\n", 1), Catch::Contains("line 3: expected '[u]<label below 2>"));
  CHECK_THAT(parse("-0\tn01/a.JPEG\n", 1), Catch::Contains("line 3: expected"));
  CHECK_THAT(parse("0\tn01/a.JPEG\n", 999999999999999999), Catch::Contains("ends after 1 of the 999999999999999999"));
  CHECK_THAT(parse("0\tn01/a.JPEG\n0\tn01/b.JPEG\n", 1), Catch::Contains("line 4: more images than the 1"));
  CHECK_THAT(parse("", -1), Catch::Contains("line 2: expected"));
  remove_tree(root);
}

TEST_CASE("imagenet: centre and 10-crop boxes sit where the protocol puts them", "[imagenet]") {
  for (auto [w, h] : {std::pair{400, 300}, std::pair{300, 400}, std::pair{500, 375}, std::pair{256, 256}}) {
    CAPTURE(w, h);
    const double f = 256.0 / std::min(w, h);
    const int side = static_cast<int>(std::lround(224 / f));
    const CropBox c = center_crop_box(w, h, 256, 224);
    CHECK(c.w == side);
    CHECK(c.h == side);
    CHECK(std::abs(2 * c.x - (w - c.w)) <= 1);  // centred to within a pixel
    CHECK(std::abs(2 * c.y - (h - c.h)) <= 1);
    const auto five = five_crop_boxes(w, h, 256, 224);
    CHECK(five[0] == CropBox{0, 0, side, side});
    CHECK(five[1] == CropBox{w - side, 0, side, side});
    CHECK(five[2] == CropBox{0, h - side, side, side});
    CHECK(five[3] == CropBox{w - side, h - side, side, side});
    CHECK(five[4] == c);
  }
}

TEST_CASE("imagenet: training views stay inside the image with the drawn scale and are deterministic", "[imagenet]") {
  ImageNetAugment a;
  std::set<int> sides;
  int flips = 0;
  for (uint64_t key = 0; key < 400; ++key) {
    const int w = 300 + static_cast<int>(key % 7) * 100, h = 250 + static_cast<int>(key % 5) * 90;
    const TrainView v = train_view(w, h, a, key);
    CAPTURE(key, w, h, v.short_side, v.box.x, v.box.y, v.box.w, v.box.h);
    CHECK(v.short_side >= 256);
    CHECK(v.short_side <= 480);
    CHECK(v.short_side == train_short_side(a, key));
    CHECK(v.box.x >= 0);
    CHECK(v.box.y >= 0);
    CHECK(v.box.x + v.box.w <= w);
    CHECK(v.box.y + v.box.h <= h);
    CHECK(std::abs(v.box.w - 224.0 * std::min(w, h) / v.short_side) <= 1.0);  // the crop at that scale
    const TrainView again = train_view(w, h, a, key);
    CHECK(again.box == v.box);
    CHECK(again.flip == v.flip);
    sides.insert(v.short_side);
    flips += v.flip;
  }
  CHECK(sides.size() > 100);  // the scale really varies over [256, 480]
  CHECK(flips > 150);
  CHECK(flips < 250);
}

TEST_CASE("imagenet: resize_crop samples the box and mirrors exactly", "[imagenet]") {
  const Image img = gradient(640, 480);
  const CropBox box{100, 50, 320, 320};
  auto out = resize_crop(img, box, 160, false);
  REQUIRE(out.sizes() == std::vector<int64_t>{3, 160, 160});
  // Red grows with x: output column j samples source x = 100 + (j + 0.5) * 2 - 0.5.
  for (int j : {0, 40, 80, 159}) {
    const double sx = 100 + (j + 0.5) * 2.0 - 0.5;
    CHECK(out[0][80][j].item<float>() == Approx(sx * 255.0 / 639).margin(1.5));
  }
  for (int i : {0, 100, 159}) {
    const double sy = 50 + (i + 0.5) * 2.0 - 0.5;
    CHECK(out[1][i][70].item<float>() == Approx(sy * 255.0 / 479).margin(1.5));
  }
  auto mirrored = resize_crop(img, box, 160, true);
  CHECK(torch::equal(mirrored, out.flip({2})));
}

TEST_CASE("imagenet: colour jitter is one affine map that keeps greys grey under hue and saturation", "[imagenet]") {
  const ColourMap id = jitter_map(Jitter{0, 0, 0, 0}, 0.4f, 7);
  for (int i = 0; i < 9; ++i) CHECK(id.m[i] == Approx(i % 4 == 0 ? 1.0f : 0.0f).margin(1e-5));
  for (float o : id.o) CHECK(o == Approx(0).margin(1e-6));
  for (uint64_t key = 0; key < 50; ++key) {
    const ColourMap m = jitter_map(Jitter{0, 0, 0.4f, 0.1f}, 0.5f, key);
    for (float g : {0.1f, 0.5f, 0.9f}) {
      float out[3];
      for (int r = 0; r < 3; ++r) out[r] = (m.m[r * 3] + m.m[r * 3 + 1] + m.m[r * 3 + 2]) * g + m.o[r];
      CHECK(out[0] == Approx(g).margin(1e-5));
      CHECK(out[1] == Approx(g).margin(1e-5));
      CHECK(out[2] == Approx(g).margin(1e-5));
    }
  }
  // Brightness alone scales; contrast alone pulls towards the mean grey.
  for (uint64_t key = 0; key < 20; ++key) {
    const ColourMap b = jitter_map(Jitter{0.4f, 0, 0, 0}, 0.5f, key);
    CHECK(b.m[0] >= 0.6f - 1e-4f);
    CHECK(b.m[0] <= 1.4f + 1e-4f);
    CHECK(b.m[1] == Approx(0).margin(1e-3));
    const ColourMap c = jitter_map(Jitter{0, 0.4f, 0, 0}, 0.5f, key);
    const float k = c.m[0];
    CHECK(c.o[0] == Approx((1 - k) * 0.5f).margin(1e-4));
  }
}

TEST_CASE("imagenet: bad files are skipped and counted and 10-crop rows are the crops and their mirrors", "[imagenet]") {
  const fs::path root = temp_tree("batch");
  write_bytes(root / "n01" / "good.JPEG", jpeg_of(320, 260, 1));
  {
    const Image g = gradient(300, 280, 2);
    std::vector<uint8_t> grey(size_t(300) * 280);
    for (size_t i = 0; i < grey.size(); ++i) grey[i] = g.rgb[i * 3];
    write_bytes(root / "n01" / "grey.JPEG", encode_jpeg(grey.data(), 300, 280, JpegPixels::gray, 90));
  }
  {
    const Image g = gradient(280, 300, 5);
    std::vector<uint8_t> cmyk(size_t(280) * 300 * 4);
    for (size_t i = 0; i < size_t(280) * 300; ++i)
      for (int k = 0; k < 4; ++k) cmyk[i * 4 + k] = k < 3 ? g.rgb[i * 3 + k] : 255;  // Adobe: 255 = no ink
    write_bytes(root / "n01" / "cmyk.JPEG", encode_jpeg(cmyk.data(), 280, 300, JpegPixels::cmyk, 90));
    const Image p = gradient(300, 260, 6);
    write_bytes(root / "n01" / "prog.JPEG", encode_jpeg(p.rgb.data(), 300, 260, JpegPixels::rgb, 90, true));
  }
  auto truncated = jpeg_of(300, 300, 3);
  truncated.resize(truncated.size() / 2);
  write_bytes(root / "n02" / "truncated.JPEG", truncated);
  write_bytes(root / "n02" / "png.JPEG", {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'});
  write_bytes(root / "n02" / "ok.JPEG", jpeg_of(260, 400, 4));
  auto list = scan_image_folder(root.string(), "", 2, nullptr);
  REQUIRE(list.size() == 7);  // n01: cmyk, good, grey, prog; n02: ok, png, truncated
  CHECK(list.labels == std::vector<int64_t>{0, 0, 0, 0, 1, 1, 1});

  DecodeErrors errors;
  ImageNetAugment a;
  const std::vector<int64_t> all{0, 1, 2, 3, 4, 5, 6};
  auto b = imagenet_train_batch(list, all, a, imagenet_normalisation(), 99, &errors);
  // The PNG and the truncated image are replaced by images drawn at random, which may be
  // either of them again: two files, at least two failed decodes.
  CHECK(errors.count.load() >= 2);
  CHECK(errors.files.load() == 2);
  CHECK(b.images.sizes() == std::vector<int64_t>{7, 3, 224, 224});
  CHECK(torch::isfinite(b.images).all().item<bool>());
  CHECK(b.labels.min().item<int64_t>() >= 0);
  CHECK(b.labels.max().item<int64_t>() <= 1);
  auto again = imagenet_train_batch(list, all, a, imagenet_normalisation(), 99, nullptr);
  CHECK(torch::equal(again.images, b.images));  // a function of (stream, index)

  DecodeErrors eval_errors;
  auto e = imagenet_eval_batch(list, 0, 7, 256, 224, true, imagenet_normalisation(), &eval_errors);
  CHECK(eval_errors.count.load() == 2);
  REQUIRE(e.images.sizes() == std::vector<int64_t>{70, 3, 224, 224});
  int64_t failed = 0;
  for (int64_t i = 0; i < 7; ++i) {
    if (e.labels[i].item<int64_t>() < 0) {
      ++failed;
      continue;
    }
    for (int64_t k = 0; k < 5; ++k) CHECK(torch::equal(e.images[i * 10 + 5 + k], e.images[i * 10 + k].flip({2})));
    CHECK_FALSE(torch::equal(e.images[i * 10], e.images[i * 10 + 3]));  // corners differ
  }
  CHECK(failed == 2);
  auto centre = imagenet_eval_batch(list, 0, 1, 256, 224, false, imagenet_normalisation(), nullptr);
  CHECK(torch::equal(centre.images[0], e.images[4]));  // the centre crop is crop 4 of the ten
  // The CMYK image (no black ink) decodes to the RGB it was made from: its centre crop's red
  // channel follows x as the source gradient does, within JPEG's error.
  const auto mean = imagenet_normalisation().mean, sd = imagenet_normalisation().std;
  auto red = centre.images[0][0] * sd[0] + mean[0];  // back to [0, 1]
  CHECK(red[112][10].item<float>() < red[112][213].item<float>());
  CHECK(red[112][112].item<float>() == Approx(0.5).margin(0.05));
  remove_tree(root);
}

TEST_CASE("train: gradient accumulation gives the full batch's gradient when BatchNorm statistics are frozen", "[train]") {
  // With BN in evaluation mode every sample's loss is independent of the others, so the mean
  // over 4 parts of 4 equals the mean over 16 up to float rounding. In training mode the
  // parts are normalised by their own statistics: the documented difference.
  blpa::NetConfig net;
  net.depth = 11;
  net.mode = {blpa::Mode::plain, 8};
  torch::manual_seed(5);
  blpa::ResNet a(net), b(net);
  {
    torch::NoGradGuard g;
    for (size_t i = 0; i < a->parameters().size(); ++i) b->parameters()[i].copy_(a->parameters()[i]);
  }
  a->eval();
  b->eval();
  auto x = torch::randn({16, 3, 16, 16});
  auto y = torch::randint(0, 10, {16});
  const double la = blpa::accumulate_gradients(a, x, y, 1);
  const double lb = blpa::accumulate_gradients(b, x, y, 4);
  CHECK(lb == Approx(la).epsilon(1e-5));
  auto pa = a->parameters(), pb = b->parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    if (!pa[i].grad().defined()) continue;
    CAPTURE(i);
    CHECK(torch::allclose(pa[i].grad(), pb[i].grad(), 1e-4, 1e-6));
  }
  CHECK_THROWS_WITH(blpa::accumulate_gradients(b, x, y, 3), Catch::Contains("must split into 3"));
}

TEST_CASE("train: blpa-train trains on an ImageNet folder and blpa-eval scores its checkpoint with 10 crops", "[train][imagenet]") {
  const fs::path root = temp_tree("e2e");
  for (const char* split : {"train", "val"})
    for (int c = 0; c < 3; ++c)
      for (int i = 0; i < (split[0] == 't' ? 4 : 2); ++i)
        write_bytes(root / split / ("n0" + std::to_string(c)) / ("img" + std::to_string(i) + ".JPEG"),
                    jpeg_of(90 + 10 * i, 70 + 5 * c, c * 10 + i));
  write_bytes(root / "val" / "n01" / "broken.JPEG", {0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3});
  const std::string ck = (root / "ck.pt").string(), log = (root / "log.jsonl").string();
  const std::string out = (root / "eval.json").string(), cache = (root / "cache").string();
  const std::string train_cmd = std::string(BLPA_TRAIN_EXE) + " --data-dir " + root.string() +
                                " --model cifar --depth 11 --batch 4 --accum-steps 2 --iterations 2 --warmup 0"
                                " --threads 2 --workers 2 --quiet --eval-every 0 --index-cache " + cache +
                                " --checkpoint " + ck + " --log " + log + " >" + (root / "train.out").string() + " 2>&1";
  REQUIRE(std::system(train_cmd.c_str()) == 0);
  std::ifstream logf(log);
  std::string text((std::istreambuf_iterator<char>(logf)), std::istreambuf_iterator<char>());
  CHECK(text.find("\"type\": \"eval\"") != std::string::npos);
  CHECK(text.find("\"images\": 6, \"failed\": 1") != std::string::npos);  // broken.JPEG left out
  {  // and said where the scores are printed
    std::ifstream f(root / "train.out");
    CHECK(std::string((std::istreambuf_iterator<char>(f)), {}).find("; 1 of 7 images could not be read or decoded") !=
          std::string::npos);
  }
  CHECK(fs::exists(cache));  // the scan was cached

  const std::string eval_cmd = std::string(BLPA_EVAL_EXE) + " --checkpoint " + ck +
                               " --ten-crop --resize 64 --crop 56 --batch 3 --json --index-cache '' > " + out +
                               " 2>" + (root / "eval.err").string();
  REQUIRE(std::system(eval_cmd.c_str()) == 0);
  std::ifstream ef(out);
  std::string json((std::istreambuf_iterator<char>(ef)), std::istreambuf_iterator<char>());
  CAPTURE(json);
  CHECK(json.find("\"ten_crop\": true, \"images\": 6, \"failed\": 1") != std::string::npos);
  CHECK(json.find("\"top5\": 1.000000") != std::string::npos);  // 3 classes: the top 5 hold them all
  {  // the largest --batch: one batch of them all (the count of batches overflowed: "no image could be evaluated")
    const std::string huge = std::string(BLPA_EVAL_EXE) + " --checkpoint " + ck +
                             " --resize 64 --crop 56 --batch 9223372036854775807 --json --index-cache '' > " + out +
                             " 2>" + (root / "eval.err").string();
    REQUIRE(std::system(huge.c_str()) == 0);
    std::ifstream hf(out);
    CHECK(std::string((std::istreambuf_iterator<char>(hf)), {}).find("\"images\": 6, \"failed\": 1") !=
          std::string::npos);
  }
  CHECK(std::system((std::string(BLPA_EVAL_EXE) + " --checkpoint " + (root / "none.pt").string() + " >/dev/null 2>&1").c_str()) != 0);

  // A --val-list of a run trained from folders takes its paths from its own folder; a list of
  // no readable image is an error, not "100% error, loss 0".
  const auto shell = [&](const std::string& cmd) {
    const int status = std::system((cmd + " > " + (root / "cmd.out").string() + " 2>&1").c_str());
    std::ifstream f(root / "cmd.out");
    return std::pair{WEXITSTATUS(status), std::string((std::istreambuf_iterator<char>(f)), {})};
  };
  fs::create_directories(root / "lists");
  std::ofstream(root / "lists" / "one.csv") << "../val/n01/img0.JPEG,1\n";
  std::ofstream(root / "lists" / "broken.csv") << "../val/n01/broken.JPEG,1\n";
  const std::string eval = std::string(BLPA_EVAL_EXE) + " --checkpoint " + ck + " --resize 64 --crop 56 --json ";
  const auto one = shell(eval + "--val-list " + (root / "lists" / "one.csv").string());
  CAPTURE(one.second);
  CHECK(one.first == 0);
  CHECK(one.second.find("\"images\": 1, \"failed\": 0") != std::string::npos);
  // A label past the network's classes names the list, the image and the label.
  std::ofstream(root / "lists" / "past.csv") << "../val/n01/img0.JPEG,1\n../val/n01/img1.JPEG,5\n";
  const auto past = shell(eval + "--val-list " + (root / "lists" / "past.csv").string());
  CHECK(past.first == 1);
  CHECK(past.second.find("--val-list " + (root / "lists" / "past.csv").string() + ": ../val/n01/img1.JPEG has label "
                         "5, but the network has 3 classes (0 to 2)") != std::string::npos);
  // --resize 0 is --resize's fault, not --crop's.
  const auto resize0 = shell(std::string(BLPA_EVAL_EXE) + " --checkpoint " + ck + " --resize 0");
  CHECK(resize0.first == 2);
  CHECK(resize0.second.find("--resize must be positive") != std::string::npos);
  // Paths taken from the wrong folder: said at once, naming the list (it was "100 images in a
  // row could not be read" at blpa-train's first batch).
  std::ofstream(root / "lists" / "wrong.csv") << "val/n01/img0.JPEG,1\n";
  const auto wrong = shell(eval + "--val-list " + (root / "lists" / "wrong.csv").string());
  CHECK(wrong.first == 1);
  CHECK(wrong.second.find("--val-list " + (root / "lists" / "wrong.csv").string() + ": its first image, "
                          "val/n01/img0.JPEG, is not at " + (root / "lists" / "val" / "n01" / "img0.JPEG").string() +
                          " (paths are taken from the list's folder)") != std::string::npos);
  const auto none = shell(eval + "--val-list " + (root / "lists" / "broken.csv").string());
  CAPTURE(none.second);
  CHECK(none.first == 1);
  CHECK(none.second.find("no image could be evaluated (1 could not be read or decoded)") != std::string::npos);
  // Its progress line says so too: it read "evaluated 1/1 images" above that error.
  const auto shown = shell(std::string(BLPA_EVAL_EXE) + " --checkpoint " + ck + " --resize 64 --crop 56 --val-list " +
                           (root / "lists" / "broken.csv").string());
  CHECK(shown.second.find("evaluated 1/1 images (1 could not be read or decoded: left out)") != std::string::npos);

  // The checkpoint keeps the classes' names as it numbered them. A val/ without n00 was
  // numbered n01 -> 0, n02 -> 1 and scored against shifted labels; a class the network never
  // saw is refused; blpa-predict names the classes as trained, whatever train/ holds now.
  fs::rename(root / "val" / "n00", root / "val-n00");
  const auto fewer = shell(eval);
  CAPTURE(fewer.second);
  CHECK(fewer.first == 0);
  CHECK(fewer.second.find("1 of the network's 3 classes has no folder here") != std::string::npos);
  fs::rename(root / "val" / "n01", root / "val" / "n09");
  const auto unknown = shell(eval);
  CHECK(unknown.first == 1);
  CHECK(unknown.second.find("class folder n09 is not one of the 3 classes the network was trained on") !=
        std::string::npos);
  fs::rename(root / "val" / "n09", root / "val" / "n01");
  fs::rename(root / "val-n00", root / "val" / "n00");
  fs::rename(root / "train" / "n00", root / "train" / "n99");
  fs::rename(root / "val" / "n00", root / "val" / "n99");
  const auto named = shell(std::string(BLPA_PREDICT_EXE) + " --checkpoint " + ck + " --top-k 3 " +
                           (root / "val" / "n01" / "img0.JPEG").string());
  CAPTURE(named.second);
  CHECK(named.first == 0);
  CHECK(named.second.find("\"name\": \"n00\"") != std::string::npos);
  CHECK(named.second.find("n99") == std::string::npos);
  // A resume on those folders would train n99's images as class 0: refused. One on the same
  // classes with an image fewer goes on, saying its data order is not the first run's.
  const std::string resume = train_cmd.substr(0, train_cmd.find(" >")) + " --iterations 3 --resume";
  const auto renamed = shell(resume);
  CAPTURE(renamed.second);
  CHECK(renamed.first == 2);
  CHECK(renamed.second.find("--resume: the training classes are not the checkpoint's (1 gone: n00) (1 new: n99)") !=
        std::string::npos);
  fs::rename(root / "train" / "n99", root / "train" / "n00");
  fs::rename(root / "val" / "n99", root / "val" / "n00");
  fs::remove(root / "train" / "n02" / "img3.JPEG");
  const auto fewer_images = shell(resume);
  CAPTURE(fewer_images.second);
  CHECK(fewer_images.first == 0);
  CHECK(fewer_images.second.find("--resume: the training images are not the checkpoint's (12 then, 11 now") !=
        std::string::npos);

  // The same data through list files, paths relative to --data-dir.
  {
    std::ofstream tl(root / "train.csv"), vl(root / "val.csv");
    for (int c = 0; c < 3; ++c)
      for (int i = 0; i < 4; ++i) {
        tl << "train/n0" << c << "/img" << i << ".JPEG," << c << "\n";
        if (i < 2) vl << "val/n0" << c << "/img" << i << ".JPEG," << c << "\n";
      }
  }
  const std::string list_cmd = std::string(BLPA_TRAIN_EXE) + " --data-dir " + root.string() + " --train-list " +
                               (root / "train.csv").string() + " --val-list " + (root / "val.csv").string() +
                               " --model cifar --depth 11 --batch 4 --iterations 1 --warmup 0 --threads 2 --quiet"
                               " --log " + (root / "list.jsonl").string() + " >" + (root / "list.out").string() + " 2>&1";
  REQUIRE(std::system(list_cmd.c_str()) == 0);
  std::ifstream lf(root / "list.jsonl");
  std::string list_log((std::istreambuf_iterator<char>(lf)), std::istreambuf_iterator<char>());
  CHECK(list_log.find("\"images\": 6, \"failed\": 0") != std::string::npos);
  // Resumed on a list whose labels go one class further: refused as a resume on other data,
  // exit 2, as other class folders are (it exited 1).
  {
    std::ofstream more(root / "more.csv");
    for (int c = 0; c < 3; ++c)
      for (int i = 0; i < 4; ++i)
        more << "train/n0" << c << "/img" << i << ".JPEG," << (c == 2 && i == 3 ? 3 : c) << "\n";
  }
  const std::string ck_flags = " --checkpoint " + (root / "list.ckpt").string() + " --overwrite";
  std::string first_list = list_cmd;
  first_list.insert(first_list.find(" >"), ck_flags);
  REQUIRE(std::system(first_list.c_str()) == 0);
  std::string more_list = list_cmd;
  more_list.replace(more_list.find((root / "train.csv").string()), (root / "train.csv").string().size(),
                    (root / "more.csv").string());
  more_list.insert(more_list.find(" >"), " --checkpoint " + (root / "list.ckpt").string() + " --resume --iterations 2");
  const int more_status = std::system(more_list.c_str());
  std::ifstream more_out(root / "list.out");
  const std::string more_text((std::istreambuf_iterator<char>(more_out)), {});
  CAPTURE(more_text);
  CHECK(WEXITSTATUS(more_status) == 2);
  CHECK(more_text.find("holds a network for 3 channels and 3 classes; the data has 3 and 4: resume with the data it "
                       "was trained on") != std::string::npos);

  // Absolute paths in a list are taken as they are; a validation label that no training image
  // has (1, below the training labels' largest) is refused as one beyond them is.
  {
    std::ofstream al(root / "absolute.csv"), tl(root / "gap.csv"), vl(root / "gap-val.csv");
    for (int c = 0; c < 3; ++c)
      for (int i = 0; i < 4; ++i) {
        al << (root / "train").string() << "/n0" << c << "/img" << i << ".JPEG," << c << "\n";
        if (c != 1) tl << "train/n0" << c << "/img" << i << ".JPEG," << c << "\n";
      }
    vl << "val/n00/img0.JPEG,0\nval/n01/img0.JPEG,1\n";
  }
  auto with_lists = [&](const std::string& train_list, const std::string& val_list) {
    std::string cmd = list_cmd;
    cmd.replace(cmd.find((root / "train.csv").string()), (root / "train.csv").string().size(), train_list);
    cmd.replace(cmd.find((root / "val.csv").string()), (root / "val.csv").string().size(), val_list);
    cmd.replace(cmd.find("list.jsonl"), 10, train_list.substr(train_list.rfind('/') + 1) + ".jsonl");
    const int status = std::system(cmd.c_str());
    std::ifstream out(root / "list.out");
    return std::pair{WEXITSTATUS(status), std::string((std::istreambuf_iterator<char>(out)), {})};
  };
  const auto absolute = with_lists((root / "absolute.csv").string(), (root / "val.csv").string());
  CAPTURE(absolute.second);
  CHECK(absolute.first == 0);
  // An image listed twice is said (it counts twice); with two labels it is refused.
  fs::copy_file(root / "train.csv", root / "twice.csv");
  fs::copy_file(root / "train.csv", root / "two-labels.csv");
  std::ofstream(root / "twice.csv", std::ios::app) << "train/n01/img2.JPEG,1\ntrain/n00/img1.JPEG,0\n";
  std::ofstream(root / "two-labels.csv", std::ios::app) << "train/n01/img2.JPEG,2\n";
  const auto twice = with_lists((root / "twice.csv").string(), (root / "val.csv").string());
  CAPTURE(twice.second);
  CHECK(twice.first == 0);
  CHECK(twice.second.find("--train-list " + (root / "twice.csv").string() + ": 2 entries repeat an image listed "
                          "before (first: train/n01/img2.JPEG), which counts once per entry") != std::string::npos);
  const auto two_labels = with_lists((root / "two-labels.csv").string(), (root / "val.csv").string());
  CAPTURE(two_labels.second);
  CHECK(two_labels.first == 1);
  CHECK(two_labels.second.find("--train-list " + (root / "two-labels.csv").string() + ": train/n01/img2.JPEG is "
                               "listed with label 1 and again with label 2") != std::string::npos);
  const auto unseen = with_lists((root / "gap.csv").string(), (root / "gap-val.csv").string());
  CAPTURE(unseen.second);
  CHECK(unseen.first == 1);
  CHECK(unseen.second.find("--val-list " + (root / "gap-val.csv").string() + ": val/n01/img0.JPEG has label 1, "
                           "which no image of --train-list " + (root / "gap.csv").string() + " has") !=
        std::string::npos);
  remove_tree(root);
}

TEST_CASE("train: decode_failures counts the batches trained, whatever --prefetch made ahead, and resumes on",
          "[train][imagenet]") {
  const fs::path root = temp_tree("decode-count");
  for (const char* split : {"train", "val"})
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 4; ++i)
        write_bytes(root / split / fmt::format("n0{}", c) / fmt::format("img{}.JPEG", i), jpeg_of(40, 36, c * 10 + i));
  write_bytes(root / "train" / "n01" / "broken.JPEG", {0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3});
  const std::string ck = (root / "r.ckpt").string();
  // The figure of each train record, as "iteration:count" pairs.
  auto counts = [&](const std::string& name, const std::string& extra) {
    const std::string log = (root / (name + ".jsonl")).string();
    const std::string cmd = std::string(BLPA_TRAIN_EXE) + " --data-dir " + root.string() +
                            " --model cifar --depth 11 --batch 3 --warmup 0 --threads 1 --workers 1 --quiet"
                            " --eval-every 0 --log-every 1 --index-cache '' --log " + log + " " + extra + " >" +
                            (root / (name + ".out")).string() + " 2>&1";
    REQUIRE(std::system(cmd.c_str()) == 0);
    std::string seen;
    const std::string text = slurp(log);
    const std::regex record("\"type\": \"train\", \"iter\": (\\d+),.*\"decode_failures\": (\\d+)");
    for (auto m = std::sregex_iterator(text.begin(), text.end(), record); m != std::sregex_iterator(); ++m)
      seen += (*m)[1].str() + ":" + (*m)[2].str() + " ";
    return seen;
  };
  const std::string ahead = counts("ahead", "--iterations 9 --prefetch 8");
  CAPTURE(ahead);
  CHECK(ahead.find(":1 ") != std::string::npos);  // the broken file was drawn
  CHECK(ahead.find(":2 ") == std::string::npos);  // and counted once, in every epoch after
  CHECK(counts("one", "--iterations 9 --prefetch 1") == ahead);
  // Stopped after 4 iterations and resumed: the log reads as the one run it is.
  CHECK(counts("split", "--iterations 4 --prefetch 8 --checkpoint " + ck) == ahead.substr(0, ahead.find(" 5:") + 1));
  CHECK(counts("split", "--iterations 9 --prefetch 8 --resume --checkpoint " + ck) == ahead);  // the whole log
  remove_tree(root);
}

// Class folders may be named with commas, '%' or line breaks: the checkpoint's one-line,
// comma-separated list writes those %XX (a line break would have ended the header's line).
TEST_CASE("imagenet: a checkpoint's class names read back whatever characters they hold", "[imagenet]") {
  blpa::Checkpoint ck;
  ck.config["classes"] = "n01,a%2Cb,c%25,d%0Ae,%zz,";
  CHECK(blpa::checkpoint_classes(ck) == std::vector<std::string>{"n01", "a,b", "c%", "d\ne", "%zz", ""});
  ck.config.erase("classes");  // a checkpoint from before they were recorded
  CHECK(blpa::checkpoint_classes(ck).empty());
}
