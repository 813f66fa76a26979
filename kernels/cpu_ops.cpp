// CPU kernels for the memory's hot paths (kernels/cpu_ops.py builds this file on first use).
//
// Each loop keeps the order and rounding of the floating-point operations of the PyTorch path it
// replaces (kernels/torch_ops.py), as measured on an AVX-512 CPU: built with -ffp-contract=off, a
// multiply-add is fused only where PyTorch's kernel fuses it (std::fma in weighted_gather where MKL's
// sparse product fuses on this CPU: kernels/cpu_ops.py asks it once). So weighted_gather, row_dot (float32, D <= 8 or a multiple of 8) and scatter_rows
// give bitwise the PyTorch path's results there, and topk_rows gives torch.topk's whenever a row's
// top k is unique (rows where it is not, or that hold a NaN, are flagged for the caller to redo
// with torch.topk). tests/test_kernels.py checks all four against the PyTorch path.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

void check_cpu_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kFloat64, name,
              " must be float32 or float64, got ", t.scalar_type());
}

template <typename scalar_t>
void topk_rows_impl(const scalar_t* x, int64_t rows, int64_t n, int64_t k, scalar_t* vals, int64_t* ids,
                    bool* redo) {
  constexpr int64_t G = 8;  // groups j mod 8: their maxima are 8 entries, so the k-th best is >= their
                            // minimum when k <= 8; only entries at or above it are candidates
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cand(n);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * n;
      scalar_t* tv = vals + r * k;
      int64_t* ti = ids + r * k;
      bool has_nan = false;
      scalar_t floor_value = -std::numeric_limits<scalar_t>::infinity();
      if (k <= G && n >= G * k) {
        scalar_t gmax[G];
        for (int64_t l = 0; l < G; ++l) gmax[l] = row[l];
        const int64_t whole = (n / G) * G;
        for (int64_t j = G; j < whole; j += G)
          for (int64_t l = 0; l < G; ++l) gmax[l] = row[j + l] > gmax[l] ? row[j + l] : gmax[l];
        floor_value = gmax[0];
        for (int64_t l = 1; l < G; ++l) floor_value = gmax[l] < floor_value ? gmax[l] : floor_value;
      }
      int64_t n_cand = 0;
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t v = row[j];
        has_nan |= std::isnan(v);
        cand[n_cand] = j;
        n_cand += v >= floor_value;  // branch-free: most entries are below the floor
      }
      int64_t filled = 0;
      for (int64_t c = 0; c < n_cand && !has_nan; ++c) {
        const scalar_t v = row[cand[c]];
        if (filled == k && !(v > tv[k - 1])) continue;
        int64_t p = filled < k ? filled++ : k - 1;
        while (p > 0 && tv[p - 1] < v) {  // insertion, best first
          tv[p] = tv[p - 1];
          ti[p] = ti[p - 1];
          --p;
        }
        tv[p] = v;
        ti[p] = cand[c];
      }
      bool unique = !has_nan && filled == k;
      for (int64_t p = 1; unique && p < k; ++p) unique = tv[p - 1] > tv[p];
      if (unique) {  // exactly k entries at or above the k-th value: no tie decides the result
        int64_t at_or_above = 0;
        for (int64_t c = 0; c < n_cand; ++c) at_or_above += row[cand[c]] >= tv[k - 1];
        unique = at_or_above == k;
      }
      redo[r] = !unique;
    }
  });
}

template <typename scalar_t, bool Fused>
void weighted_gather_impl(const scalar_t* w, const scalar_t* table, const int64_t* idx, int64_t M, int64_t P,
                          int64_t D, scalar_t* out) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      scalar_t* o = out + m * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0;
      for (int64_t p = 0; p < P; ++p) {
        const scalar_t wp = w == nullptr ? scalar_t(1) : w[m * P + p];
        const scalar_t* t = table + idx[m * P + p] * D;
        if (Fused) {  // as MKL's CSR product rounds where it fuses (the caller asks the PyTorch path which)
          for (int64_t d = 0; d < D; ++d) o[d] = std::fma(wp, t[d], o[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = o[d] + wp * t[d];
        }
      }
    }
  });
}

template <typename scalar_t>
void row_dot_impl(const scalar_t* x, const scalar_t* table, const int64_t* idx, int64_t M, int64_t P, int64_t D,
                  scalar_t* out) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const scalar_t* xm = x + m * D;
      for (int64_t p = 0; p < P; ++p) {
        const scalar_t* t = table + idx[m * P + p] * D;
        // eight lanes of products summed down the row, then halved (8 -> 4 -> 2 -> 1): the order of
        // PyTorch's vectorised dot product in sampled_addmm, so the same rounding
        scalar_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t d0 = 0; d0 < D; d0 += 8) {
          const int64_t lanes = D - d0 < 8 ? D - d0 : 8;
          for (int64_t l = 0; l < lanes; ++l) {
            const scalar_t prod = xm[d0 + l] * t[d0 + l];
            acc[l] = d0 == 0 ? prod : acc[l] + prod;
          }
        }
        for (int w = 4; w >= 1; w /= 2)
          for (int l = 0; l < w; ++l) acc[l] = acc[l] + acc[l + w];
        out[m * P + p] = acc[0];
      }
    }
  });
}

template <typename scalar_t>
void scatter_rows_impl(const scalar_t* w, const scalar_t* x, const int64_t* idx, int64_t M, int64_t P, int64_t D,
                       const scalar_t* row_scale, int64_t n_rows, scalar_t* out) {
  // each thread owns a block of columns and goes through the reads in index_add_'s order (m * P + p):
  // no two threads write one element, and every element's sum is bitwise the sequential one
  const int64_t grain = M * P * D < (1 << 16) ? D : 16;
  at::parallel_for(0, D, grain, [&](int64_t d0, int64_t d1) {
    for (int64_t m = 0; m < M; ++m) {
      const scalar_t* xm = x + m * D;
      for (int64_t p = 0; p < P; ++p) {
        scalar_t* o = out + idx[m * P + p] * D;
        if (w == nullptr) {
          for (int64_t d = d0; d < d1; ++d) o[d] += xm[d];
        } else {
          const scalar_t wp = w[m * P + p];
          for (int64_t d = d0; d < d1; ++d) {
            const scalar_t prod = wp * xm[d];
            o[d] += prod;
          }
        }
      }
    }
  });
  if (row_scale != nullptr) {
    at::parallel_for(0, n_rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t d = 0; d < D; ++d) out[r * D + d] *= row_scale[r];
    });
  }
}

void check_rows(const torch::Tensor& idx, const torch::Tensor& table_or_x, const char* name) {
  TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == torch::kInt64 && idx.is_contiguous(),
              "idx must be a contiguous int64 [M, P] tensor");
  TORCH_CHECK(table_or_x.dim() == 2 && table_or_x.is_contiguous(), name, " must be a contiguous 2-d tensor");
  check_cpu_float(table_or_x, name);
}

const void* optional_ptr(const c10::optional<torch::Tensor>& t, const torch::Tensor& like, int64_t numel,
                         const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_contiguous() && t->scalar_type() == like.scalar_type() && t->numel() == numel, name,
              " must be contiguous, of the table's dtype and of ", numel, " elements");
  return t->data_ptr();
}

}  // namespace

std::vector<torch::Tensor> topk_rows(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [rows, n] tensor");
  check_cpu_float(x, "x");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "k=", k, " must be in [1, n=", x.size(1), "]");
  auto vals = torch::empty({x.size(0), k}, x.options());
  auto ids = torch::empty({x.size(0), k}, x.options().dtype(torch::kInt64));
  auto redo = torch::empty({x.size(0)}, x.options().dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "topk_rows", [&] {
    topk_rows_impl<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), k, vals.data_ptr<scalar_t>(),
                             ids.data_ptr<int64_t>(), redo.data_ptr<bool>());
  });
  return {vals, ids, redo};
}

torch::Tensor weighted_gather(const c10::optional<torch::Tensor>& w, const torch::Tensor& table,
                              const torch::Tensor& idx, bool fused) {
  check_rows(idx, table, "table");
  const int64_t M = idx.size(0), P = idx.size(1), D = table.size(1);
  auto out = torch::empty({M, D}, table.options());
  const void* wp = optional_ptr(w, table, M * P, "w");
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "weighted_gather", [&] {
    auto impl = fused ? weighted_gather_impl<scalar_t, true> : weighted_gather_impl<scalar_t, false>;
    impl(static_cast<const scalar_t*>(wp), table.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), M, P, D,
         out.data_ptr<scalar_t>());
  });
  return out;
}

torch::Tensor row_dot(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& idx) {
  check_rows(idx, table, "table");
  check_rows(idx, x, "x");
  const int64_t M = idx.size(0), P = idx.size(1), D = table.size(1);
  auto out = torch::empty({M, P}, table.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "row_dot", [&] {
    row_dot_impl<scalar_t>(x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), M, P, D,
                           out.data_ptr<scalar_t>());
  });
  return out;
}

torch::Tensor scatter_rows(const c10::optional<torch::Tensor>& w, const torch::Tensor& x, const torch::Tensor& idx,
                           int64_t n_rows, const c10::optional<torch::Tensor>& row_scale) {
  check_rows(idx, x, "x");
  const int64_t M = idx.size(0), P = idx.size(1), D = x.size(1);
  auto out = torch::zeros({n_rows, D}, x.options());
  const void* wp = optional_ptr(w, x, M * P, "w");
  const void* sp = optional_ptr(row_scale, x, n_rows, "row_scale");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scatter_rows", [&] {
    scatter_rows_impl<scalar_t>(static_cast<const scalar_t*>(wp), x.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
                                M, P, D, static_cast<const scalar_t*>(sp), n_rows, out.data_ptr<scalar_t>());
  });
  return out;
}

bool has_repeated_ids(const torch::Tensor& idx) {
  TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == torch::kInt64 && idx.is_contiguous(),
              "idx must be a contiguous int64 [M, P] tensor");
  const int64_t M = idx.size(0), P = idx.size(1);
  const int64_t* id = idx.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 1; p < P; ++p)
      for (int64_t q = 0; q < p; ++q)
        if (id[m * P + p] == id[m * P + q]) return true;
  return false;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_rows", &topk_rows, "top-k of each row, best first, with a flag per row whose result a tie decides");
  m.def("weighted_gather", &weighted_gather, "out[m] = sum_p w[m,p] table[idx[m,p]] (fused: with fma)");
  m.def("has_repeated_ids", &has_repeated_ids, "whether a row of idx [M, P] holds an id twice");
  m.def("row_dot", &row_dot, "out[m,p] = <x[m], table[idx[m,p]]>");
  m.def("scatter_rows", &scatter_rows, "out[r] = row_scale[r] sum_{idx[m,p]=r} w[m,p] x[m]");
}
