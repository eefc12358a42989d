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
    // Per output value k = column * channels + channel: where its two source values sit in a crop row.
    const int64_t out_values = out_width * channels, crop_values = crop_width * channels;
    std::vector<int32_t> first(out_values), second(out_values);
    std::vector<float> weight(out_values);
    for (int64_t k = 0; k < out_values; ++k) {
      const int64_t column = k / channels, channel = k % channels;
      first[k] = static_cast<int32_t>(columns.lo[column] * channels + channel);
      second[k] = static_cast<int32_t>(columns.hi[column] * channels + channel);
      weight[k] = columns.weight[column];
    }
    Tensor blended_row;
    OP_REQUIRES_OK(context, context->allocate_temp(::tensorflow::DT_FLOAT, TensorShape({crop_values}), &blended_row));
    float* blended = blended_row.flat<float>().data();
    const uint8_t* source = image.flat<uint8_t>().data() + left * channels;
    uint8_t* out = output->flat<uint8_t>().data();
    const int64_t row_values = width * channels;
    for (int64_t y = 0; y < out_height; ++y) {
      const uint8_t* top = source + rows.lo[y] * row_values;
      const uint8_t* bottom = source + rows.hi[y] * row_values;
      const float w = rows.weight[y];
      for (int64_t j = 0; j < crop_values; ++j) {
        const float t = top[j];
        blended[j] = t + (static_cast<float>(bottom[j]) - t) * w;
      }
      uint8_t* out_row = out + y * out_values;
      for (int64_t k = 0; k < out_values; ++k) {
        const float a = blended[first[k]];
        // Weights are in [0, 1], so values stay in [0, 255]: + 0.5 and truncation round half up.
        out_row[k] = static_cast<uint8_t>(a + (blended[second[k]] - a) * weight[k] + 0.5f);
      }
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
