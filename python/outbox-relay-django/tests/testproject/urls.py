from django.urls import path

from testproject.shop import views

urlpatterns = [
    path("orders/", views.create_order),
    path("orders/failing/", views.create_order_then_fail),
]
