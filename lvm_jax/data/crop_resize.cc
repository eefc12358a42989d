// LvmCropResizeBilinear: a column range of a uint8 image, resized bilinearly to a fixed size, in one pass.
//
// The training crop otherwise costs TensorFlow a row copy inside DecodeAndCropJpeg (whenever the window's
// left edge is not on the JPEG's block column), a uint8 -> float32 cast of the whole crop, the float resize
// and a float -> uint8 pass. Here the decoder is given the block-aligned window and this kernel reads the
// crop's columns straight from it, uint8 in and out. Sampling is TensorFlow's ResizeBilinear with
// half-pixel centres (no antialiasing), rounded half up; the vertical pass runs first (over contiguous rows,
// which the compiler vectorises), so a value may differ from TensorFlow's order of operations by one level.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;
namespace shape_inference = ::tensorflow::shape_inference;

struct Taps {
  std::vector<int64_t> lo, hi;
  std::vector<float> weight;
};

// Source positions of `out` samples over `in` pixels, as ResizeBilinear(half_pixel_centers=True) takes them.
Taps SampleTaps(int64_t out, int64_t in) {
  Taps taps{std::vector<int64_t>(out), std::vector<int64_t>(out), std::vector<float>(out)};
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t i = 0; i < out; ++i) {
    const float position = (static_cast<float>(i) + 0.5f) * scale - 0.5f;
    const float below = std::floor(position);
    taps.lo[i] = std::max(static_cast<int64_t>(below), int64_t{0});
    taps.hi[i] = std::min(static_cast<int64_t>(std::ceil(position)), in - 1);
    taps.weight[i] = position - below;
  }
  return taps;
}

// Four float lanes as one value (GCC/Clang vector extension: SSE on x86-64, NEON on ARM, scalar elsewhere).
typedef float Lanes __attribute__((vector_size(16)));

// The two contiguous loops run about twice as fast with AVX2; target_clones picks the variant once, at load time,
// so the library still runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define LVM_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef LVM_VECTOR_CLONES
#define LVM_VECTOR_CLONES
#endif

// out[j] = top[j] + (bottom[j] - top[j]) * w: one output row's vertical blend over the crop's values.
LVM_VECTOR_CLONES void BlendRows(const uint8_t* top, const uint8_t* bottom, float w, int64_t count, float* out) {
  for (int64_t j = 0; j < count; ++j) {
    const float t = top[j];
    out[j] = t + (static_cast<float>(bottom[j]) - t) * w;
  }
}

// Values already offset by 0.5 and inside [0, 256): truncation rounds half up.
LVM_VECTOR_CLONES void TruncateToUint8(const float* values, int64_t count, uint8_t* out) {
  for (int64_t k = 0; k < count; ++k) out[k] = static_cast<uint8_t>(static_cast<int32_t>(values[k]));
}

class CropResizeBilinearOp : public OpKernel {
 public:
  explicit CropResizeBilinearOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& image = context->input(0);
    OP_REQUIRES(context, image.dims() == 3,
                errors::InvalidArgument("image must be [height, width, channels], got ", image.shape().DebugString()));
    const int64_t height = image.dim_size(0), width = image.dim_size(1), channels = image.dim_size(2);
    const int64_t left = context->input(1).scalar<int32_t>()();
    const int64_t crop_width = context->input(2).scalar<int32_t>()();
    const auto size = context->input(3).vec<int32_t>();
    OP_REQUIRES(context, size.size() == 2 && size(0) > 0 && size(1) > 0,
                errors::InvalidArgument("size must be 2 positive ints"));
    OP_REQUIRES(context, height > 0 && channels > 0 && left >= 0 && crop_width > 0 && left + crop_width <= width,
                errors::InvalidArgument("columns [", left, ", ", left + crop_width, ") are not inside an image of ",
                                        "shape ", image.shape().DebugString()));
    const int64_t out_height = size(0), out_width = size(1);
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({out_height, out_width, channels}), &output));

    const Taps rows = SampleTaps(out_height, height);
    const Taps columns = SampleTaps(out_width, crop_width);
    const int64_t out_values = out_width * channels, crop_values = crop_width * channels;
    // Room past the ends for the horizontal pass's whole-Lanes loads and stores.
    const int64_t slack = sizeof(Lanes) / sizeof(float);
    std::vector<float> blended(crop_values + slack, 0.f), line(out_values + slack);
    const uint8_t* source = image.flat<uint8_t>().data() + left * channels;
    uint8_t* out = output->flat<uint8_t>().data();
    const int64_t row_values = width * channels;
    for (int64_t y = 0; y < out_height; ++y) {
      BlendRows(source + rows.lo[y] * row_values, source + rows.hi[y] * row_values, rows.weight[y], crop_values,
                blended.data());
      if (channels <= slack) {
        HorizontalByPixel(blended.data(), columns, channels, line.data());
      } else {
        HorizontalByValue(blended.data(), columns, channels, line.data());
      }
      TruncateToUint8(line.data(), out_values, out + y * out_values);
    }
  }

 private:
  // A pixel's channels in one Lanes: the left and right source pixels loaded whole (spare lanes carry the next
  // pixel's values and are overwritten by the next store). Where both taps are the same pixel (the edges) the
  // weight is 0, so the next pixel's values never count. Same float operations as HorizontalByValue.
  static void HorizontalByPixel(const float* blended, const Taps& columns, int64_t channels, float* line) {
    const Lanes half = {0.5f, 0.5f, 0.5f, 0.5f};
    for (size_t x = 0; x < columns.lo.size(); ++x) {
      const float* at = blended + columns.lo[x] * channels;
      Lanes a, b;
      std::memcpy(&a, at, sizeof a);
      std::memcpy(&b, at + channels, sizeof b);
      const float w = columns.hi[x] == columns.lo[x] ? 0.f : columns.weight[x];
      const Lanes value = a + (b - a) * w + half;
      std::memcpy(line + x * channels, &value, sizeof value);
    }
  }

  static void HorizontalByValue(const float* blended, const Taps& columns, int64_t channels, float* line) {
    for (size_t x = 0; x < columns.lo.size(); ++x) {
      const float* a = blended + columns.lo[x] * channels;
      const float* b = blended + columns.hi[x] * channels;
      for (int64_t c = 0; c < channels; ++c) line[x * channels + c] = a[c] + (b[c] - a[c]) * columns.weight[x] + 0.5f;
    }
  }
};

}  // namespace

REGISTER_OP("LvmCropResizeBilinear")
    .Input("image: uint8")
    .Input("left: int32")
    .Input("crop_width: int32")
    .Input("size: int32")
    .Output("resized: uint8")
    .SetShapeFn([](shape_inference::InferenceContext* context) {
      shape_inference::ShapeHandle image, size;
      TF_RETURN_IF_ERROR(context->WithRank(context->input(0), 3, &image));
      TF_RETURN_IF_ERROR(context->MakeShapeFromShapeTensor(3, &size));
      TF_RETURN_IF_ERROR(context->WithRank(size, 2, &size));
      context->set_output(0, context->MakeShape({context->Dim(size, 0), context->Dim(size, 1), context->Dim(image, 2)}));
      return ::absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("LvmCropResizeBilinear").Device(::tensorflow::DEVICE_CPU), CropResizeBilinearOp);
