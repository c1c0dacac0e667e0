#include <unistd.h>
#include "catch_torch.h"
#include "messages.h"
#include "tensor_bits.h"

#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "misc/log.h"
#include "mpu/error.h"
#include "mpu/flat_buffer.h"

namespace {

using mpu::FlatBuffer;
using mpu::FlatBufferOptions;
using mpu::FlatTarget;
using mpu::ZeroCopy;
using Named = std::vector<std::pair<std::string, torch::Tensor>>;

// --- Helpers -------------------------------------------------------------------------------------

using mpu::test::message_of;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

int count_of(const std::string& haystack, const std::string& needle) {
  int n = 0;
  for (auto pos = haystack.find(needle); pos != std::string::npos;
       pos = haystack.find(needle, pos + needle.size())) {
    ++n;
  }
  return n;
}

using mpu::test::same_bits;

const torch::Tensor& target_of(const torch::Tensor& t, FlatTarget target) {
  return target == FlatTarget::kGrad ? t.grad() : t;
}

// The closed form of gather: each tensor flattened, times scale in fp32, rounded once to the
// wire dtype, concatenated; a missing gradient is zeros.
torch::Tensor expected_gather(const std::vector<torch::Tensor>& tensors, FlatTarget target,
                              torch::Dtype wire, double scale) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts;
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    const torch::Tensor& src = target_of(t, target);
    if (!src.defined()) {
      parts.push_back(torch::zeros({t.numel()}, torch::dtype(wire)));
    } else if (static_cast<float>(scale) == 1.0f) {
      parts.push_back(src.detach().cpu().reshape({-1}).to(wire));
    } else {
      const auto s = static_cast<double>(static_cast<float>(scale));
      parts.push_back((src.detach().cpu().reshape({-1}).to(torch::kFloat) * s).to(wire));
    }
  }
  if (parts.empty()) return torch::empty({0}, torch::dtype(wire));
  return torch::cat(parts);
}

Named named_of(const std::vector<torch::Tensor>& tensors) {
  Named named;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    named.emplace_back("t" + std::to_string(i), tensors[i]);
  }
  return named;
}

// Shapes that cover the kernels' cases: a few elements (head and tail only), sizes that are not
// a multiple of the 8-element pack, one chunk exactly, one element past it, several chunks, an
// empty tensor (skipped).
const std::vector<std::vector<std::int64_t>> kShapes = {
    {3, 5},          {7},           {1},   {0}, {2, 3, 4}, {8192}, {8193}, {16384}, {16385},
    {2 * 16384 + 5}, {64, 3, 3, 3}, {1000}};

// How a test tensor sits in memory.
enum class Layout { kContiguous, kMisaligned, kTransposed };

// A tensor with the values `values` on `device`: contiguous; or contiguous but starting one
// element into its storage (so not 16-byte aligned); or a non-contiguous transpose.
torch::Tensor place(const torch::Tensor& values, torch::Device device, Layout layout) {
  torch::NoGradGuard no_grad;
  const auto opts = values.options().device(device);
  switch (layout) {
    case Layout::kMisaligned: {
      torch::Tensor base = torch::zeros({values.numel() + 1}, opts);
      torch::Tensor t = base.narrow(0, 1, values.numel()).view(values.sizes());
      t.copy_(values);
      return t;
    }
    case Layout::kTransposed:
      if (values.dim() >= 2)
        return values.transpose(0, -1).contiguous().to(device).transpose(0, -1);
      return values.to(device).clone();
    case Layout::kContiguous:
    default:
      return values.to(device).clone();
  }
}

// One tensor per shape, dtypes cycling through `dtypes`, values from `seed`, each with a gradient
// except where `with_grads` says otherwise. When `layouts` is true, some tensors and gradients
// are misaligned or transposed.
std::vector<torch::Tensor> make_tensors(const std::vector<torch::Dtype>& dtypes,
                                        torch::Device device, std::uint64_t seed,
                                        bool layouts = false,
                                        const std::vector<bool>& with_grads = {}) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> out;
  for (std::size_t i = 0; i < kShapes.size(); ++i) {
    const torch::Dtype dtype = dtypes[i % dtypes.size()];
    const torch::Tensor values = (torch::randn(kShapes[i]) * 3).to(dtype);
    const torch::Tensor grad_values = torch::randn(kShapes[i]).to(dtype);
    const Layout layout = !layouts ? Layout::kContiguous : static_cast<Layout>(i % 3);
    torch::Tensor t = place(values, device, layout);
    const bool grad = i < with_grads.size() ? with_grads[i] : true;
    if (grad) {
      t.mutable_grad() = place(grad_values, device,
                               layouts ? static_cast<Layout>((i + 1) % 3) : Layout::kContiguous);
    }
    out.push_back(t);
  }
  return out;
}

struct ConvLinearImpl : torch::nn::Module {
  ConvLinearImpl()
      : conv(register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 3)))),
        fc(register_module("fc", torch::nn::Linear(3 * 6 * 6, 5))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(torch::relu(conv(x)).flatten(1)); }
  torch::nn::Conv2d conv;
  torch::nn::Linear fc;
};
TORCH_MODULE(ConvLinear);

struct ChildImpl : torch::nn::Module {
  ChildImpl() {
    register_parameter("w", torch::randn({3, 5}));
    register_parameter("b", torch::randn({5}).to(torch::kHalf));
  }
};

struct RootImpl : torch::nn::Module {
  RootImpl() {
    register_parameter("first", torch::randn({2, 2}).to(torch::kBFloat16));
    child = register_module("child", std::make_shared<ChildImpl>());
    register_parameter("empty", torch::empty({0}));
    register_parameter("last", torch::randn({4}, torch::kDouble));
  }
  std::shared_ptr<ChildImpl> child;
};

void copy_parameters(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto src = from.parameters();
  auto dst = to.parameters();
  REQUIRE(src.size() == dst.size());
  for (std::size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
}

bool parameters_equal(torch::nn::Module& a, torch::nn::Module& b) {
  auto pa = a.parameters();
  auto pb = b.parameters();
  if (pa.size() != pb.size()) return false;
  for (std::size_t i = 0; i < pa.size(); ++i) {
    if (!same_bits(pa[i], pb[i])) return false;
  }
  return true;
}

torch::Tensor cat_flat(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> parts;
  for (const auto& t : tensors) parts.push_back(t.detach().reshape({-1}));
  return torch::cat(parts);
}

std::vector<torch::Tensor> grads_of(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.grad());
  return out;
}

// True when every tensor (or its gradient) of `fb` is exactly its slot of `flat`.
bool all_views(const FlatBuffer& fb, const torch::Tensor& flat, FlatTarget target) {
  for (std::size_t i = 0; i < fb.size(); ++i) {
    const torch::Tensor& t = target_of(fb.tensors()[i], target);
    const auto* slot =
        static_cast<const char*>(flat.data_ptr()) + fb.entries()[i].offset * flat.element_size();
    if (!t.defined() || t.data_ptr() != slot) return false;
  }
  return true;
}

// Redirects stderr (fd 2) into a temporary file until finish().
class StderrCapture {
 public:
  StderrCapture() : file_(std::tmpfile()) {
    std::fflush(stderr);
    saved_ = ::dup(STDERR_FILENO);
    ::dup2(::fileno(file_), STDERR_FILENO);
  }
  ~StderrCapture() {
    restore();
    if (file_ != nullptr) std::fclose(file_);
  }
  StderrCapture(const StderrCapture&) = delete;
  StderrCapture& operator=(const StderrCapture&) = delete;

  std::string finish() {
    restore();
    std::string text;
    std::rewind(file_);
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, file_)) > 0;) text.append(buf, n);
    return text;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, STDERR_FILENO);
    ::close(saved_);
    saved_ = -1;
  }
  std::FILE* file_;
  int saved_ = -1;
};

const char* const kRepairWarning = "is no longer a view into the zero-copy flat buffer";

bool cuda_or_skip() {
  if (torch::cuda::is_available()) return true;
  WARN("skipped: no CUDA device (torch::cuda::is_available() is false)");
  return false;
}

// --- Shared bodies, run on CPU and on CUDA
// ---------------------------------------------------------

struct RoundTripCase {
  const char* name;
  std::vector<torch::Dtype> dtypes;
  torch::Dtype wire;
};

// Dtype sets whose round trip through the wire dtype is lossless.
const std::vector<RoundTripCase> kLosslessCases = {
    {"fp32 through fp32", {torch::kFloat}, torch::kFloat},
    {"fp16 through fp16", {torch::kHalf}, torch::kHalf},
    {"fp16 through fp32", {torch::kHalf}, torch::kFloat},
    {"bf16 through bf16", {torch::kBFloat16}, torch::kBFloat16},
    {"bf16 through fp32", {torch::kBFloat16}, torch::kFloat},
    {"mixed fp32/fp16/bf16 through fp32",
     {torch::kFloat, torch::kHalf, torch::kBFloat16},
     torch::kFloat},
};

void check_round_trips(torch::Device device, bool layouts) {
  for (const auto& c : kLosslessCases) {
    INFO(c.name << (layouts ? ", misaligned and transposed tensors" : ""));
    const auto a = make_tensors(c.dtypes, device, 1, layouts);
    const auto b = make_tensors(c.dtypes, device, 2, layouts);
    FlatBuffer fa(named_of(a));
    FlatBuffer fb(named_of(b));
    for (const FlatTarget target : {FlatTarget::kData, FlatTarget::kGrad}) {
      INFO((target == FlatTarget::kData ? "data" : "grad"));
      const torch::Tensor flat = fa.gather(target, c.wire);
      CHECK(flat.device() == device);
      CHECK(same_bits(flat, expected_gather(a, target, c.wire, 1.0)));
      fb.scatter(flat, target);
      for (std::size_t i = 0; i < a.size(); ++i) {
        INFO("tensor " << i);
        CHECK(same_bits(target_of(b[i], target), target_of(a[i], target)));
      }
    }
  }
}

void check_sgd_transfer(torch::Device device) {
  torch::manual_seed(7);
  ConvLinear a;
  ConvLinear b;
  a->to(device);
  b->to(device);
  FlatBuffer fa(*a);
  FlatBuffer fb(*b);
  CHECK(fa.size() == 4);
  fb.scatter(fa.gather(FlatTarget::kData), FlatTarget::kData);
  REQUIRE(parameters_equal(*a, *b));
  const torch::Tensor before = cat_flat(a->parameters()).clone();
  torch::optim::SGD oa(a->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD ob(b->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int step = 0; step < 3; ++step) {
    oa.zero_grad();
    ob.zero_grad();
    const torch::Tensor x = torch::randn({4, 2, 8, 8}).to(device);
    a->forward(x).pow(2).sum().backward();
    fb.scatter(fa.gather(FlatTarget::kGrad), FlatTarget::kGrad);
    for (std::size_t i = 0; i < fa.size(); ++i) {
      REQUIRE(same_bits(fb.tensors()[i].grad(), fa.tensors()[i].grad()));
    }
    oa.step();
    ob.step();
    INFO("step " << step);
    CHECK(parameters_equal(*a, *b));
  }
  CHECK_FALSE(torch::equal(before, cat_flat(a->parameters())));
}

void check_missing_grads(torch::Device device) {
  // Tensors 1 and 4 have no gradient.
  std::vector<bool> grads(kShapes.size(), true);
  grads[1] = grads[4] = false;
  const auto a = make_tensors({torch::kFloat, torch::kHalf}, device, 3, false, grads);
  FlatBuffer fa(named_of(a));
  torch::Tensor flat = torch::full({fa.numel()}, 7.0, torch::dtype(torch::kFloat).device(device));
  fa.gather_into(FlatTarget::kGrad, flat);
  CHECK(same_bits(flat, expected_gather(a, FlatTarget::kGrad, torch::kFloat, 1.0)));
  for (std::size_t i : {std::size_t{1}, std::size_t{4}}) {
    const auto& e = fa.entries()[i < 3 ? i : i - 1];  // entry 3 is the empty tensor, skipped
    CHECK(flat.narrow(0, e.offset, e.numel).eq(0).all().item<bool>());
  }

  auto b = make_tensors({torch::kFloat, torch::kHalf}, device, 4, false,
                        std::vector<bool>(kShapes.size(), false));
  FlatBuffer fb(named_of(b));
  fb.scatter(flat, FlatTarget::kGrad);
  for (std::size_t i = 0; i < b.size(); ++i) {
    if (b[i].numel() == 0) continue;
    INFO("tensor " << i);
    REQUIRE(b[i].grad().defined());
    // make_tensors gives a gradient to every tensor past the end of `grads`.
    if (i >= grads.size() || grads[i]) {
      CHECK(same_bits(b[i].grad(), a[i].grad()));
    } else {
      CHECK(b[i].grad().eq(0).all().item<bool>());
    }
  }
}

void check_zero_copy_training(torch::Device device) {
  torch::manual_seed(11);
  ConvLinear zc;
  ConvLinear ref;
  zc->to(device);
  ref->to(device);
  copy_parameters(*zc, *ref);
  FlatBuffer fz(*zc, FlatBufferOptions{torch::kFloat, ZeroCopy::kOn});
  REQUIRE(fz.zero_copy());
  CHECK(fz.zero_copy_reason().empty());
  CHECK(fz.flat_data().numel() == fz.numel());
  CHECK(all_views(fz, fz.flat_data(), FlatTarget::kData));
  CHECK(all_views(fz, fz.flat_grad(), FlatTarget::kGrad));
  CHECK(parameters_equal(*zc, *ref));
  torch::optim::SGD oz(zc->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  torch::optim::SGD oref(ref->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    fz.zero_grad();
    oref.zero_grad();
    const torch::Tensor x = torch::randn({4, 2, 8, 8}).to(device);
    zc->forward(x).pow(2).sum().backward();
    ref->forward(x).pow(2).sum().backward();
    CHECK(all_views(fz, fz.flat_grad(), FlatTarget::kGrad));
    const torch::Tensor g = fz.gather(FlatTarget::kGrad);
    CHECK(g.data_ptr() == fz.flat_grad().data_ptr());
    CHECK(torch::allclose(g, cat_flat(grads_of(ref->parameters())), 1e-5, 1e-6));
    fz.scatter(g, FlatTarget::kGrad);  // the buffer itself: nothing to do
    oz.step();
    oref.step();
    CHECK(all_views(fz, fz.flat_data(), FlatTarget::kData));
    CHECK(fz.gather(FlatTarget::kData).data_ptr() == fz.flat_data().data_ptr());
    CHECK(same_bits(fz.flat_data(), cat_flat(zc->parameters())));
    CHECK(torch::allclose(fz.flat_data(), cat_flat(ref->parameters()), 1e-5, 1e-6));
  }
  CHECK(fz.stats().repairs == 0);
  // Another dtype or a scale makes a converted copy and leaves the buffer alone.
  const torch::Tensor half = fz.gather(FlatTarget::kGrad, torch::kHalf, 0.5);
  CHECK(half.data_ptr() != fz.flat_grad().data_ptr());
  CHECK(same_bits(half, (fz.flat_grad().cpu() * 0.5).to(torch::kHalf)));
}

void check_zero_copy_repair(torch::Device device) {
  const auto a = make_tensors({torch::kFloat}, device, 5);
  FlatBuffer fz(named_of(a), FlatBufferOptions{torch::kFloat, ZeroCopy::kOn});
  REQUIRE(fz.zero_copy());
  // The constructor copied the existing gradients and parameters into the buffers.
  CHECK(same_bits(fz.flat_grad(), expected_gather(a, FlatTarget::kGrad, torch::kFloat, 1.0)));
  CHECK(same_bits(fz.flat_data(), expected_gather(a, FlatTarget::kData, torch::kFloat, 1.0)));

  torch::Tensor p0 = fz.tensors()[0];
  torch::Tensor p1 = fz.tensors()[1];
  const auto opts = torch::dtype(torch::kFloat).device(device);
  p0.mutable_grad() = torch::full(p0.sizes(), 2.5, opts);  // replaced
  p1.mutable_grad() = torch::Tensor();                     // set to none
  StderrCapture capture;
  const torch::Tensor g = fz.gather(FlatTarget::kGrad);
  const std::string err = capture.finish();
  CHECK(g.data_ptr() == fz.flat_grad().data_ptr());
  CHECK(same_bits(g, expected_gather(fz.tensors(), FlatTarget::kGrad, torch::kFloat, 1.0)));
  CHECK(g.narrow(0, fz.entries()[0].offset, fz.entries()[0].numel).eq(2.5).all().item<bool>());
  CHECK(g.narrow(0, fz.entries()[1].offset, fz.entries()[1].numel).eq(0).all().item<bool>());
  CHECK(all_views(fz, fz.flat_grad(), FlatTarget::kGrad));
  CHECK(fz.stats().repairs == 2);
  if (mpu::detail::log_level() >= mpu::detail::LogLevel::kWarn) {
    CHECK(count_of(err, kRepairWarning) == 1);
    CHECK(contains(err, "parameter 't0'"));
  }

  // Again: repaired, but the warning is not repeated.
  p0.mutable_grad() = torch::full(p0.sizes(), -1.0, opts);
  {
    torch::NoGradGuard no_grad;
    p1.set_data(torch::full(p1.sizes(), 4.0, opts));
  }
  StderrCapture capture2;
  const torch::Tensor d = fz.gather(FlatTarget::kData);
  const torch::Tensor g2 = fz.gather(FlatTarget::kGrad);
  const std::string err2 = capture2.finish();
  CHECK(count_of(err2, kRepairWarning) == 0);
  CHECK(fz.stats().repairs == 4);
  CHECK(d.narrow(0, fz.entries()[1].offset, fz.entries()[1].numel).eq(4.0).all().item<bool>());
  CHECK(g2.narrow(0, fz.entries()[0].offset, fz.entries()[0].numel).eq(-1.0).all().item<bool>());
  CHECK(all_views(fz, fz.flat_data(), FlatTarget::kData));
  CHECK(all_views(fz, fz.flat_grad(), FlatTarget::kGrad));

  // Scattering another tensor writes the buffer; zero_grad() zeros it and silently re-attaches.
  const torch::Tensor other = torch::randn({fz.numel()}, opts);
  fz.scatter(other, FlatTarget::kData);
  CHECK(same_bits(fz.flat_data(), other));
  CHECK(same_bits(cat_flat(fz.tensors()), other));
  p0.mutable_grad() = torch::Tensor();
  fz.zero_grad();
  CHECK(fz.flat_grad().eq(0).all().item<bool>());
  CHECK(all_views(fz, fz.flat_grad(), FlatTarget::kGrad));
  CHECK(fz.stats().repairs == 4);
}

}  // namespace

// --- CPU ---------------------------------------------------------------------------------------

TEST_CASE("FlatBuffer lays out named_parameters in order, skipping empty and tied tensors",
          "[flat_buffer]") {
  auto root = std::make_shared<RootImpl>();
  FlatBuffer fb(*root);
  std::vector<std::string> expected_names;
  for (const auto& item : root->named_parameters()) {
    if (item.value().numel() > 0) expected_names.push_back(item.key());
  }
  // A module's own parameters, in registration order, then its submodules'.
  CHECK(expected_names == std::vector<std::string>{"first", "last", "child.w", "child.b"});
  REQUIRE(fb.size() == 4);
  const auto& e = fb.entries();
  for (std::size_t i = 0; i < e.size(); ++i) CHECK(e[i].name == expected_names[i]);
  CHECK(e[0].offset == 0);
  CHECK(e[1].offset == 4);
  CHECK(e[2].offset == 8);
  CHECK(e[3].offset == 23);
  CHECK(fb.numel() == 28);
  CHECK(e[2].shape == std::vector<std::int64_t>{3, 5});
  CHECK(e[0].dtype == torch::kBFloat16);
  CHECK(e[1].dtype == torch::kDouble);
  CHECK(e[2].dtype == torch::kFloat);
  CHECK(e[3].dtype == torch::kHalf);
  CHECK(fb.device() == torch::Device(torch::kCPU));
  CHECK(fb.tensors()[2].data_ptr() == root->named_parameters()["child.w"].data_ptr());

  // A second, identically built model gets the identical layout.
  FlatBuffer again(*std::make_shared<RootImpl>());
  REQUIRE(again.size() == fb.size());
  for (std::size_t i = 0; i < e.size(); ++i) {
    CHECK(again.entries()[i].name == e[i].name);
    CHECK(again.entries()[i].offset == e[i].offset);
  }

  // A tensor list is named by index; a tensor listed twice is packed once.
  const torch::Tensor t = torch::randn({3});
  FlatBuffer list({t, torch::empty({0}), torch::randn({2, 2}), t});
  REQUIRE(list.size() == 2);
  CHECK(list.entries()[0].name == "0");
  CHECK(list.entries()[1].name == "2");
  CHECK(list.entries()[1].offset == 3);
  CHECK(list.numel() == 7);

  FlatBuffer empty(std::vector<torch::Tensor>{});
  CHECK(empty.numel() == 0);
  CHECK(empty.gather(FlatTarget::kGrad).numel() == 0);
}

TEST_CASE("CPU round trips are bit-exact for fp32, fp16, bf16 and mixed models", "[flat_buffer]") {
  SECTION("contiguous tensors") {
    check_round_trips(torch::kCPU, false);
  }
  SECTION("misaligned and transposed tensors") {
    check_round_trips(torch::kCPU, true);
  }
}

TEST_CASE("CPU gather converts and scales in fp32 with one rounding, and scatter converts back",
          "[flat_buffer]") {
  const auto a =
      make_tensors({torch::kFloat, torch::kHalf, torch::kBFloat16, torch::kDouble}, torch::kCPU, 8);
  auto b =
      make_tensors({torch::kFloat, torch::kHalf, torch::kBFloat16, torch::kDouble}, torch::kCPU, 9);
  FlatBuffer fa(named_of(a));
  FlatBuffer fb(named_of(b));
  for (const torch::Dtype wire : {torch::kFloat, torch::kHalf, torch::kBFloat16}) {
    for (const double scale : {1.0, 0.25, 1.0 / 3.0}) {
      INFO("wire " << wire << ", scale " << scale);
      const torch::Tensor flat = fa.gather(FlatTarget::kGrad, wire, scale);
      CHECK(flat.scalar_type() == wire);
      CHECK(same_bits(flat, expected_gather(a, FlatTarget::kGrad, wire, scale)));
      torch::Tensor into = torch::empty({fa.numel()}, torch::dtype(wire));
      fa.gather_into(FlatTarget::kGrad, into, scale);
      CHECK(same_bits(into, flat));
      fb.scatter(flat, FlatTarget::kData);
      for (std::size_t i = 0; i < b.size(); ++i) {
        if (b[i].numel() == 0) continue;
        const auto& e = fb.entries()[i < 3 ? i : i - 1];
        CHECK(same_bits(b[i], flat.narrow(0, e.offset, e.numel).view(e.shape).to(e.dtype)));
      }
    }
  }
  // The default wire dtype is the buffer's.
  CHECK(fa.gather(FlatTarget::kData).scalar_type() == torch::kFloat);
  FlatBuffer half(named_of(a), FlatBufferOptions{torch::kHalf, ZeroCopy::kOff});
  CHECK(same_bits(half.gather(FlatTarget::kData),
                  expected_gather(a, FlatTarget::kData, torch::kHalf, 1.0)));
}

TEST_CASE("CPU: gradients of model A scattered into model B give equal parameters after SGD",
          "[flat_buffer]") {
  check_sgd_transfer(torch::kCPU);
}

TEST_CASE("CPU: missing gradients gather as zeros and scatter creates them", "[flat_buffer]") {
  check_missing_grads(torch::kCPU);
}

TEST_CASE("CPU zero-copy: views survive backward and optimizer steps", "[flat_buffer]") {
  check_zero_copy_training(torch::kCPU);
}

TEST_CASE("CPU zero-copy: a replaced gradient or parameter is copied back, warned once",
          "[flat_buffer]") {
  check_zero_copy_repair(torch::kCPU);
}

TEST_CASE("Zero-copy needs the buffer's dtype: kAuto falls back, kOn throws", "[flat_buffer]") {
  const std::vector<torch::Tensor> mixed = {torch::randn({4}), torch::randn({3}).to(torch::kHalf)};
  FlatBuffer automatic(mixed, FlatBufferOptions{torch::kFloat, ZeroCopy::kAuto});
  CHECK_FALSE(automatic.zero_copy());
  CHECK(automatic.zero_copy_reason() == "parameter '1' has dtype Half, the buffer Float");
  CHECK(same_bits(automatic.gather(FlatTarget::kData),
                  expected_gather(mixed, FlatTarget::kData, torch::kFloat, 1.0)));
  CHECK_THROWS_AS(automatic.flat_grad(), mpu::InvalidArgument);
  CHECK(contains(message_of([&] { (void)automatic.flat_data(); }),
                 "FlatBuffer::flat_data: zero-copy mode is off: parameter '1' has dtype Half"));

  CHECK_THROWS_AS(FlatBuffer(mixed, FlatBufferOptions{torch::kFloat, ZeroCopy::kOn}),
                  mpu::InvalidArgument);
  CHECK(contains(message_of([&] {
                   FlatBuffer(mixed, {torch::kFloat, ZeroCopy::kOn});
                 }),
                 "zero-copy mode (ZeroCopy::kOn) is impossible: parameter '1' has dtype Half, "
                 "the buffer Float"));

  const std::vector<torch::Tensor> halves = {torch::randn({4}).to(torch::kHalf),
                                             torch::randn({3}).to(torch::kHalf)};
  FlatBuffer zc(halves, FlatBufferOptions{torch::kHalf, ZeroCopy::kAuto});
  CHECK(zc.zero_copy());
  CHECK(zc.flat_data().scalar_type() == torch::kHalf);
  CHECK(halves[1].data_ptr() ==
        static_cast<char*>(zc.flat_data().data_ptr()) + 4 * zc.flat_data().element_size());

  FlatBuffer off(halves, FlatBufferOptions{torch::kHalf, ZeroCopy::kOff});
  CHECK_FALSE(off.zero_copy());
}

TEST_CASE("FlatBuffer errors name the parameter or argument and the values seen", "[flat_buffer]") {
  const torch::Tensor cpu = torch::randn({3});
  const torch::Tensor meta = torch::empty({2}, torch::TensorOptions().device(torch::kMeta));

  CHECK_THROWS_AS(FlatBuffer(Named{{"a", cpu}, {"b", meta}}), mpu::InvalidArgument);
  CHECK(contains(message_of([&] {
                   FlatBuffer(Named{{"a", cpu}, {"b", meta}});
                 }),
                 "FlatBuffer: parameter 'b' is on meta but parameter 'a' is on cpu; all "
                 "parameters must be on one device"));
  CHECK(contains(message_of([&] {
                   FlatBuffer(Named{{"idx", torch::arange(4)}});
                 }),
                 "FlatBuffer: parameter 'idx' has dtype Long; only floating-point parameters"));
  CHECK_THROWS_AS(FlatBuffer(Named{{"idx", torch::arange(4)}}), mpu::InvalidArgument);
  CHECK(contains(message_of([&] { FlatBuffer({cpu}, FlatBufferOptions{torch::kDouble}); }),
                 "FlatBufferOptions::dtype is Double; it must be Float, Half or BFloat16"));

  const torch::Tensor p = torch::randn({2, 2});
  FlatBuffer fb(Named{{"w", p}, {"b", torch::randn({3})}});
  REQUIRE(fb.numel() == 7);
  CHECK_THROWS_AS(fb.scatter(torch::zeros({8}), FlatTarget::kData), mpu::InvalidArgument);
  CHECK(contains(message_of([&] { fb.scatter(torch::zeros({8}), FlatTarget::kData); }),
                 "FlatBuffer::scatter: `flat` has 8 elements, but the layout has 7"));
  CHECK(contains(
      message_of([&] { fb.gather_into(FlatTarget::kGrad, torch::zeros({7}, torch::kDouble)); }),
      "FlatBuffer::gather_into: `flat` has dtype Double; it must be Float, Half or "
      "BFloat16"));
  CHECK(contains(message_of([&] {
                   fb.scatter(torch::empty({7}, torch::TensorOptions().device(torch::kMeta)),
                              FlatTarget::kGrad);
                 }),
                 "FlatBuffer::scatter: `flat` is on meta, but the parameters are on cpu"));
  CHECK(contains(message_of([&] {
                   fb.scatter(torch::zeros({7, 2}).select(1, 0), FlatTarget::kData);
                 }),
                 "must be a contiguous"));
  CHECK(contains(message_of([&] { fb.gather(FlatTarget::kGrad, torch::kInt); }),
                 "FlatBuffer::gather: the wire dtype is Int; it must be Float, Half or "
                 "BFloat16"));
  CHECK(contains(message_of([&] { fb.gather(FlatTarget::kGrad, torch::kFloat, 1e300); }),
                 "FlatBuffer::gather: scale is 1e+300, which is not a finite fp32 number"));

  p.mutable_grad() = torch::zeros({4});
  CHECK(contains(message_of([&] { fb.gather(FlatTarget::kGrad); }),
                 "FlatBuffer::gather: the gradient of parameter 'w' has shape [4], the "
                 "parameter [2, 2]"));
  p.mutable_grad() = torch::Tensor();
  {
    torch::NoGradGuard no_grad;
    p.set_data(torch::randn({3, 3}));
  }
  CHECK_THROWS_AS(fb.gather(FlatTarget::kData), mpu::InvalidArgument);
  CHECK(contains(message_of([&] { fb.gather(FlatTarget::kData); }),
                 "FlatBuffer::gather: parameter 'w' changed since the layout was built: it was "
                 "Float [2, 2] on cpu, it is now Float [3, 3] on cpu; build a new FlatBuffer"));
}

TEST_CASE("FlatBuffer::all_finite finds inf and NaN", "[flat_buffer]") {
  torch::Tensor flat = torch::randn({1000});
  CHECK(FlatBuffer::all_finite(flat));
  CHECK(FlatBuffer::all_finite(torch::empty({0})));
  flat[500] = std::numeric_limits<float>::infinity();
  CHECK_FALSE(FlatBuffer::all_finite(flat));
  flat[500] = std::numeric_limits<float>::quiet_NaN();
  CHECK_FALSE(FlatBuffer::all_finite(flat));
  CHECK_FALSE(FlatBuffer::all_finite(torch::full({3}, 70000.0).to(torch::kHalf)));
}

// --- CUDA ------------------------------------------------------------------------------------

TEST_CASE("CUDA round trips are bit-exact for fp32, fp16, bf16 and mixed models",
          "[flat_buffer][cuda]") {
  if (!cuda_or_skip()) return;
  SECTION("contiguous tensors") {
    check_round_trips(torch::Device(torch::kCUDA, 0), false);
  }
  SECTION("misaligned and transposed tensors") {
    check_round_trips(torch::Device(torch::kCUDA, 0), true);
  }
}

TEST_CASE("CUDA gather and scatter agree bit for bit with the CPU path", "[flat_buffer][cuda]") {
  if (!cuda_or_skip()) return;
  const std::vector<std::vector<torch::Dtype>> dtype_sets = {
      {torch::kFloat},
      {torch::kHalf},
      {torch::kBFloat16},
      {torch::kFloat, torch::kHalf, torch::kBFloat16, torch::kDouble}};
  const std::vector<bool> grads = {true, true, false, true, true, true, true, false, true, true};
  for (const bool layouts : {false, true}) {
    for (const auto& dtypes : dtype_sets) {
      const auto cpu = make_tensors(dtypes, torch::kCPU, 21, layouts, grads);
      const auto gpu = make_tensors(dtypes, torch::kCUDA, 21, layouts, grads);
      FlatBuffer fc(named_of(cpu));
      FlatBuffer fg(named_of(gpu));
      for (const torch::Dtype wire : {torch::kFloat, torch::kHalf, torch::kBFloat16}) {
        for (const double scale : {1.0, 0.25, 1.0 / 3.0}) {
          for (const FlatTarget target : {FlatTarget::kData, FlatTarget::kGrad}) {
            INFO("layouts " << layouts << ", dtypes " << dtypes.size() << " (first " << dtypes[0]
                            << "), wire " << wire << ", scale " << scale << ", target "
                            << (target == FlatTarget::kData ? "data" : "grad"));
            const torch::Tensor on_cpu = fc.gather(target, wire, scale);
            const torch::Tensor on_gpu = fg.gather(target, wire, scale);
            CHECK(on_gpu.is_cuda());
            CHECK(same_bits(on_gpu, on_cpu));
            CHECK(same_bits(on_cpu, expected_gather(cpu, target, wire, scale)));
          }
        }
        // Scatter of the same random flat buffer.
        torch::manual_seed(99);
        const torch::Tensor flat = (torch::randn({fc.numel()}) * 5).to(wire);
        for (const FlatTarget target : {FlatTarget::kData, FlatTarget::kGrad}) {
          fc.scatter(flat, target);
          fg.scatter(flat.to(torch::kCUDA), target);
          for (std::size_t i = 0; i < cpu.size(); ++i) {
            INFO("scatter, wire " << wire << ", tensor " << i);
            CHECK(same_bits(target_of(gpu[i], target), target_of(cpu[i], target)));
          }
        }
      }
    }
  }
}

TEST_CASE("CUDA: gradients of model A scattered into model B give equal parameters after SGD",
          "[flat_buffer][cuda]") {
  if (!cuda_or_skip()) return;
  check_sgd_transfer(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("CUDA: missing gradients gather as zeros and scatter creates them",
          "[flat_buffer][cuda]") {
  if (!cuda_or_skip()) return;
  check_missing_grads(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("CUDA: pointer tables are cached and rebuilt only when storage changes",
          "[flat_buffer][cuda]") {
  if (!cuda_or_skip()) return;
  auto a = make_tensors({torch::kFloat, torch::kHalf}, torch::kCUDA, 31);
  FlatBuffer fa(named_of(a));
  CHECK(fa.stats().table_builds == 0);
  torch::Tensor flat = fa.gather(FlatTarget::kGrad);
  CHECK(fa.stats().table_builds == 1);
  fa.gather_into(FlatTarget::kGrad, flat, 0.5);
  flat = fa.gather(FlatTarget::kGrad, torch::kBFloat16);
  CHECK(fa.stats().table_builds == 1);
  fa.scatter(flat, FlatTarget::kGrad);  // same gradients, same table
  CHECK(fa.stats().table_builds == 1);

  a[0].mutable_grad() = torch::full_like(a[0], 3.0);  // new storage
  flat = fa.gather(FlatTarget::kGrad);
  CHECK(fa.stats().table_builds == 2);
  CHECK(flat.narrow(0, 0, a[0].numel()).eq(3.0).all().item<bool>());
  CHECK(same_bits(flat, expected_gather(a, FlatTarget::kGrad, torch::kFloat, 1.0)));

  a[1].mutable_grad() = torch::Tensor();  // gone: gathers as zeros, through a new table
  flat = fa.gather(FlatTarget::kGrad);
  CHECK(fa.stats().table_builds == 3);
  CHECK(same_bits(flat, expected_gather(a, FlatTarget::kGrad, torch::kFloat, 1.0)));

  const torch::Tensor data = fa.gather(FlatTarget::kData);
  CHECK(fa.stats().table_builds == 4);
  fa.scatter(data, FlatTarget::kData);
  fa.gather(FlatTarget::kData);
  CHECK(fa.stats().table_builds == 4);
  CHECK(same_bits(data, expected_gather(a, FlatTarget::kData, torch::kFloat, 1.0)));
}

TEST_CASE("CUDA zero-copy: views survive backward and optimizer steps", "[flat_buffer][cuda]") {
  if (!cuda_or_skip()) return;
  check_zero_copy_training(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("CUDA zero-copy: a replaced gradient or parameter is copied back, warned once",
          "[flat_buffer][cuda]") {
  if (!cuda_or_skip()) return;
  check_zero_copy_repair(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("CUDA: parameters on two devices, or a flat buffer on the wrong one, are refused",
          "[flat_buffer][cuda]") {
  if (!cuda_or_skip()) return;
  const torch::Tensor on_cpu = torch::randn({3});
  const torch::Tensor on_gpu = torch::randn({3}, torch::kCUDA);
  CHECK(contains(message_of([&] {
                   FlatBuffer(Named{{"cpu_w", on_cpu}, {"gpu_w", on_gpu}});
                 }),
                 "FlatBuffer: parameter 'gpu_w' is on cuda:0 but parameter 'cpu_w' is on cpu"));
  FlatBuffer fb(Named{{"w", on_gpu}});
  CHECK(fb.device() == torch::Device(torch::kCUDA, 0));
  CHECK(contains(message_of([&] { fb.scatter(torch::zeros({3}), FlatTarget::kData); }),
                 "FlatBuffer::scatter: `flat` is on cpu, but the parameters are on cuda:0"));
  on_gpu.mutable_grad() = torch::zeros({3});
  CHECK(contains(message_of([&] { fb.gather(FlatTarget::kGrad); }),
                 "FlatBuffer::gather: the gradient of parameter 'w' is on cpu, the parameter on "
                 "cuda:0"));
}
