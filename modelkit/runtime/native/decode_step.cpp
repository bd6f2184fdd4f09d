// modelkit's native decode step: one forward pass of the GPT-2 composition (learned positions,
// pre-norm blocks of LayerNorm, multi-head sdpa attention with stacked q/k/v, MLP with the
// activation fused into its first oneDNN matmul, final LayerNorm, head) in C++.
//
// It calls the very kernels the Python inference steps call (mkldnn::_linear_pointwise,
// at::layer_norm, at::scaled_dot_product_attention, embedding, add, copy_) with the same
// arguments in the same order, so its logits equal theirs bit for bit; what it removes is the
// Python between the kernels, which runs with cold caches in every layer of a decode step (the
// layer's weights have just streamed through them). Built on first use by modelkit/native.py.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

Tensor linear(const Tensor& x, const Tensor& w, const OptTensor& b, c10::string_view post,
              c10::string_view algorithm) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view,
                                     c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(x, w, b, post, c10::List<std::optional<c10::Scalar>>(), algorithm);
}

constexpr size_t kPerLayer = 12;  // ln1 w/b, qkv w/b, out w/b, ln2 w/b, fc1 w/b, fc2 w/b

}  // namespace

// The GPT-2 composition's weights and settings, held once; ``step`` runs one cached forward pass.
class GPT2Decoder {
 public:
  // ``params``: per layer the kPerLayer tensors above, then final norm w/b, head w/b, token
  // embedding, position table. ``eps``: per norm (2 per layer, then the final one).
  GPT2Decoder(std::vector<OptTensor> params, std::vector<double> eps, int64_t heads, std::string fc1_post,
              std::string fc1_algorithm)
      : params_(std::move(params)), eps_(std::move(eps)), heads_(heads), fc1_post_(std::move(fc1_post)),
        fc1_algorithm_(std::move(fc1_algorithm)) {
    TORCH_CHECK(params_.size() == kPerLayer * (eps_.size() - 1) / 2 + 6, "GPT2Decoder: params do not match eps");
  }

  // The (b, h, max_length, d) key and value storage of each layer, kept until the next call (empty
  // lists: let the storage go).
  void set_cache(std::vector<Tensor> k_cache, std::vector<Tensor> v_cache) {
    TORCH_CHECK((k_cache.empty() || k_cache.size() * 2 + 1 == eps_.size()) && v_cache.size() == k_cache.size(),
                "GPT2Decoder: one key and one value storage per layer");
    k_cache_ = std::move(k_cache);
    v_cache_ = std::move(v_cache);
  }

  // Logits (b, 1, vocab) for the last of ``idx``'s tokens, which continue ``start`` cached tokens;
  // writes their keys and values at [start, start + s). The caller guarantees s == 1 or start == 0
  // and start + s <= max_length.
  Tensor step(const Tensor& idx, int64_t start) const {
    TORCH_CHECK(!k_cache_.empty(), "GPT2Decoder: set_cache first");
    c10::InferenceMode guard;
    const auto& p = params_;
    const int64_t b = idx.size(0), s = idx.size(1), end = start + s;
    const size_t n = p.size(), layers = k_cache_.size();
    const Tensor& pos_table = *p[n - 1];
    const int64_t e = pos_table.size(1);
    Tensor positions = at::arange(start, end, idx.options());
    Tensor x = at::embedding(*p[n - 2], idx) + at::index(pos_table, c10::List<OptTensor>({positions}));
    for (size_t i = 0; i < layers; ++i) {
      const OptTensor* w = &p[i * kPerLayer];
      Tensor y = at::layer_norm(x, {e}, w[0], w[1], eps_[2 * i]);
      std::vector<Tensor> qkv = linear(y, *w[2], w[3], "none", "").split_with_sizes({e, e, e}, -1);
      Tensor q = qkv[0].view({b, s, heads_, -1}).transpose(1, 2);
      k_cache_[i].slice(2, start, end).copy_(qkv[1].view({b, s, heads_, -1}).transpose(1, 2));
      v_cache_[i].slice(2, start, end).copy_(qkv[2].view({b, s, heads_, -1}).transpose(1, 2));
      Tensor out = at::scaled_dot_product_attention(q, k_cache_[i].slice(2, 0, end), v_cache_[i].slice(2, 0, end),
                                                    std::nullopt, 0.0, /*is_causal=*/s > 1);
      x = x + linear(out.transpose(1, 2).reshape({b, s, -1}), *w[4], w[5], "none", "");
      y = at::layer_norm(x, {e}, w[6], w[7], eps_[2 * i + 1]);
      x = x + linear(linear(y, *w[8], w[9], fc1_post_, fc1_algorithm_), *w[10], w[11], "none", "");
    }
    x = at::layer_norm(x, {e}, p[n - 6], p[n - 5], eps_[2 * layers]).slice(1, s - 1, s);
    return linear(x, *p[n - 4], p[n - 3], "none", "");
  }

 private:
  std::vector<OptTensor> params_;
  std::vector<double> eps_;
  int64_t heads_;
  std::string fc1_post_, fc1_algorithm_;
  std::vector<Tensor> k_cache_, v_cache_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<GPT2Decoder>(m, "GPT2Decoder")
      .def(pybind11::init<std::vector<OptTensor>, std::vector<double>, int64_t, std::string, std::string>())
      .def("set_cache", &GPT2Decoder::set_cache)
      .def("step", &GPT2Decoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
