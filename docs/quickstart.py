import torch

from pyro_ntk import NTKGPRegression, fit

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.Tanh(), torch.nn.Linear(40, 1))
X, opt = torch.linspace(-5, 5, 200).unsqueeze(-1), torch.optim.Adam(net.parameters(), lr=1e-2)
for _ in range(300):  # the source task: y = sin(x)
    opt.zero_grad()
    (net(X) - torch.sin(X)).square().mean().backward()
    opt.step()

g = torch.Generator().manual_seed(0)  # the target task, 20 points: y = 1.5 sin(x + 0.5) + 0.1 ε
Xt = 8 * torch.rand(20, 1, generator=g) - 4
yt = 1.5 * torch.sin(Xt + 0.5).squeeze(-1) + 0.1 * torch.randn(20, generator=g)  # noise s² = 0.01
gpr = NTKGPRegression(Xt, yt, net)  # mean f(x; θ*), kernel σ²JJᵀ; s², σ² start from the data
result = fit(gpr)  # the noise s² and σ² by the marginal likelihood: result.converged, .losses
mean, var = gpr(torch.linspace(-5, 5, 100).unsqueeze(-1))  # posterior mean and variance
