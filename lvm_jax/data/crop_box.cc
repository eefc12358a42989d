// LvmInceptionCropBox: the inception crop's box from its random draws, in one kernel.
//
// As TensorFlow ops the box arithmetic is ~100 tiny graph ops, each a trip through the executor (~60 us of CPU
// per image on one thread). This kernel does the arithmetic of lvm_jax.data.ops.inception_crop_box (float32,
// in the same order of operations, rounding half to even as tf.round), so both paths pick the same window from
// the same random numbers.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace {

namespace tf = ::tensorflow;

class InceptionCropBoxOp : public tf::OpKernel {
 public:
  explicit InceptionCropBoxOp(tf::OpKernelConstruction* context) : tf::OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("area_min", &area_min_));
    OP_REQUIRES_OK(context, context->GetAttr("area_max", &area_max_));
    OP_REQUIRES_OK(context, context->GetAttr("ratio_min", &ratio_min_));
    OP_REQUIRES_OK(context, context->GetAttr("ratio_max", &ratio_max_));
  }

  // Inputs: image_size [2] int32; area_uniform [tries], aspect [tries], position_uniform [2] float32 (in [0, 1),
  // the aspect ratios already drawn log-uniformly). Output: [top, left, height, width] int32.
  void Compute(tf::OpKernelContext* context) override {
    for (int i = 0; i < 4; ++i) {
      OP_REQUIRES(context, tf::TensorShapeUtils::IsVector(context->input(i).shape()),
                  tf::errors::InvalidArgument("input ", i, " must be a vector, got shape ",
                                              context->input(i).shape().DebugString()));
    }
    const auto size = context->input(0).vec<int32_t>();
    const auto area_uniform = context->input(1).vec<float>();
    const auto aspect = context->input(2).vec<float>();
    const auto position = context->input(3).vec<float>();
    OP_REQUIRES(context, size.size() == 2 && size(0) > 0 && size(1) > 0,
                tf::errors::InvalidArgument("image_size must be 2 positive ints"));
    OP_REQUIRES(context, area_uniform.size() == aspect.size() && area_uniform.size() > 0 && position.size() == 2,
                tf::errors::InvalidArgument("need as many area draws as aspect draws, and 2 position draws"));
    const int32_t height = size(0), width = size(1);
    const float h = static_cast<float>(height), w = static_cast<float>(width);
    int32_t crop_height = 0, crop_width = 0;
    bool fits = false;
    for (int64_t i = 0; i < area_uniform.size() && !fits; ++i) {
      const float area = h * w * (area_uniform(i) * (area_max_ - area_min_) + area_min_);
      const float cw = std::nearbyint(std::sqrt(area * aspect(i)));
      const float ch = std::nearbyint(std::sqrt(area / aspect(i)));
      fits = cw >= 1.f && cw <= w && ch >= 1.f && ch <= h;
      crop_height = static_cast<int32_t>(ch);
      crop_width = static_cast<int32_t>(cw);
    }
    int32_t top, left;
    if (fits) {
      top = std::min(static_cast<int32_t>(position(0) * static_cast<float>(height - crop_height + 1)),
                     height - crop_height);
      left = std::min(static_cast<int32_t>(position(1) * static_cast<float>(width - crop_width + 1)),
                      width - crop_width);
    } else {  // the whole image, narrowed to the nearest allowed aspect ratio, centred
      const float image_ratio = w / h;
      crop_width = static_cast<int32_t>(image_ratio > ratio_max_ ? std::nearbyint(h * ratio_max_) : w);
      crop_height = static_cast<int32_t>(image_ratio < ratio_min_ ? std::nearbyint(w / ratio_min_) : h);
      top = (height - crop_height) / 2;
      left = (width - crop_width) / 2;
    }
    tf::Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, tf::TensorShape({4}), &output));
    auto box = output->vec<int32_t>();
    box(0) = top;
    box(1) = left;
    box(2) = crop_height;
    box(3) = crop_width;
  }

 private:
  float area_min_, area_max_, ratio_min_, ratio_max_;
};

}  // namespace

REGISTER_OP("LvmInceptionCropBox")
    .Input("image_size: int32")
    .Input("area_uniform: float")
    .Input("aspect: float")
    .Input("position_uniform: float")
    .Attr("area_min: float")
    .Attr("area_max: float")
    .Attr("ratio_min: float")
    .Attr("ratio_max: float")
    .Output("box: int32")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* context) {
      ::tensorflow::shape_inference::ShapeHandle vector;
      for (int i = 0; i < 4; ++i) TF_RETURN_IF_ERROR(context->WithRank(context->input(i), 1, &vector));
      context->set_output(0, context->Vector(4));
      return ::absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("LvmInceptionCropBox").Device(::tensorflow::DEVICE_CPU), InceptionCropBoxOp);
